"""cluster.yaml: valid for the Ray cluster launcher, and it starts the Serve config the code builds."""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text(encoding="utf-8"))


def test_cluster_yaml_passes_the_cluster_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster()))  # what `ray up` does before any cloud call
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    workers = prepared["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] >= workers["min_workers"] >= 1
    assert "senmon[gpu]" in " ".join(prepared["setup_commands"])  # the GPU extra on every node


def test_a_broken_cluster_yaml_is_refused():
    import jsonschema

    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = cluster()
    broken["available_node_types"]["head"]["resourcez"] = {"CPU": 8}
    with pytest.raises(jsonschema.ValidationError, match="resourcez"):
        validate_config(prepare_config(broken))


def test_the_head_deploys_the_serve_config_that_the_code_builds(tmp_path):
    from senmon.config import load_config
    from senmon.serve.app import build_serve_config

    commands = cluster()["head_start_ray_commands"]
    generate = next(c for c in commands if "serve-config" in c)
    deploy = next(c for c in commands if c.startswith("serve deploy"))
    assert any("senmon" in c and " up --cluster" in c for c in commands)  # then the control plane
    # "cd DIR && senmon --config FILE serve-config > OUT": run the same senmon command here
    cd_part, senmon_part = generate.split("&&")
    argv = shlex.split(senmon_part.split(">")[0])
    written_to = senmon_part.split(">")[1].strip()
    assert argv[0] == "senmon" and deploy.split()[-1] == written_to  # serve deploy takes that very file
    # The production config's storage root is an S3 bucket this machine cannot reach: run the
    # command on a copy whose storage root is local, everything else unchanged.
    production = yaml.safe_load((REPO / argv[argv.index("--config") + 1]).read_text(encoding="utf-8"))
    production["storage_root"] = str(tmp_path / "storage")
    config_file = tmp_path / "production.yaml"
    config_file.write_text(yaml.safe_dump(production), encoding="utf-8")
    argv[argv.index("--config") + 1] = str(config_file)
    out = subprocess.run([sys.executable, "-m", "senmon.cli", *argv[1:]], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    built = yaml.safe_load(out.stdout)
    assert built == build_serve_config(load_config(config_file), str(config_file.resolve()))
    router = built["applications"][0]
    assert router["import_path"] == "senmon.serve.app:build_router" and router["route_prefix"] == "/"
    assert router["args"]["config"] == str(config_file.resolve())
    # the same import path builds an application here (what `serve deploy` will import)
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # noqa: F401
    from senmon.serve.app import build_router

    assert build_router(router["args"]) is not None
