"""cluster.yaml: valid for the Ray cluster launcher, and it starts the Serve config the code builds."""

from __future__ import annotations

import copy
import re
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
    assert "SENMON_EXTRA=gpu bash scripts/setup.sh" in " ".join(prepared["setup_commands"])  # the GPU extra on every node


def test_cluster_yaml_runs_the_same_commands_as_the_local_cluster_that_ray_up_is_tested_with():
    from ray.autoscaler._private.util import prepare_config, validate_config

    from senmon.cluster import RSYNC_EXCLUDE, RayPorts, commands, local_cluster, repository_mounts

    cloud = cluster()
    assert {key: cloud[key] for key in commands("gpu", "x")} == commands("gpu", "configs/production.example.yaml")
    assert cloud["rsync_exclude"] == RSYNC_EXCLUDE and cloud["file_mounts"] == repository_mounts(".", "/home/ray")
    # the local-provider file of tests/test_ray_up.py: line for line the same, but for the extra, the
    # config file and the ports
    ports = RayPorts(gcs=16379, object_manager=18076, dashboard=18265, client_server=20001, dashboard_agent=22365)
    local = local_cluster("senmon-local", "someone", "/tmp/key", str(REPO), "/home/someone/ci.yaml", ports=ports)
    prepared = prepare_config(copy.deepcopy(local))
    validate_config(prepared)
    assert prepared["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert prepared["head_setup_commands"] == local["setup_commands"]  # what the launcher runs on the head
    assert prepared["file_mounts"] == repository_mounts(str(REPO), "/home/someone")

    def as_local(cloud_line: str) -> str:  # cluster.yaml's line with the local file's parameters
        for default, port in zip(RayPorts().__dict__.values(), ports.__dict__.values()):
            cloud_line = re.sub(rf"(?<=[=:]){default}\b", str(port), cloud_line)
        return cloud_line.replace("configs/production.example.yaml", "/home/someone/ci.yaml").replace(
            "SENMON_EXTRA=gpu", "SENMON_EXTRA=cpu")

    for key in commands("gpu", "x"):
        assert [as_local(line) for line in cloud[key]] == local[key], key


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


def test_ray_starts_on_every_node_in_the_environment_senmon_ray_env_prints(tmp_path):
    """The head's and the workers' `ray start` lines load `senmon ray-env` for the config first: run
    that part here (on a copy of the production config with a local storage root) and compare what it
    exports with `ray_start_environment`; a config that does not load stops the line before `ray start`."""
    from senmon.cluster import ray_start_environment
    from senmon.config import load_config

    production = yaml.safe_load((REPO / "configs" / "production.example.yaml").read_text(encoding="utf-8"))
    production["storage_root"] = str(tmp_path / "storage")
    config_file = tmp_path / "production.yaml"
    config_file.write_text(yaml.safe_dump(production), encoding="utf-8")
    expected = ray_start_environment(load_config(config_file))
    assert expected["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # production: HAProxy (tests/test_ray_up.py serves through it)
    senmon_bin = Path(sys.executable).parent
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        line = next(c for c in cluster()[key] if "ray start" in c)
        before_ray_start = line.split("ray start")[0].replace("~/senmon", str(REPO)).replace(
            "configs/production.example.yaml", str(config_file))
        shell = f"export PATH={senmon_bin}:$PATH; {before_ray_start} env"
        out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        exported = dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith("RAY_SERVE_"))
        assert {k: exported.get(k) for k in expected} == expected, (key, exported)
    broken = f"export PATH={senmon_bin}:$PATH; " + before_ray_start.replace(str(config_file), "/nonexistent.yaml") + \
        " echo started"
    out = subprocess.run(["bash", "-c", broken], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "started" not in out.stdout and "nonexistent" in out.stderr, (out.stdout, out.stderr)


def test_every_part_of_the_repository_is_synced_to_the_nodes_or_deliberately_not():
    from senmon.cluster import NOT_ON_NODES, ON_NODES

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    top_level = {path.split("/")[0] for path in tracked}
    assert top_level == set(ON_NODES) | set(NOT_ON_NODES), "add the new path to ON_NODES or NOT_ON_NODES"
    assert not set(ON_NODES) & set(NOT_ON_NODES)


def test_status_names_a_front_door_that_is_not_the_configured_one(make_config, embedded_config_data, monkeypatch):
    """A cluster whose Ray was started by hand, without `senmon ray-env`, runs Serve's proxy while the config asks
    for HAProxy: the line `senmon status` and `senmon up` print says so and what to do (what Ray runs is asked of
    Ray itself in tests/test_serve.py, tests/test_cli.py and tests/test_ray_up.py)."""
    import senmon.cluster as cluster_module

    config = make_config(ray=dict(embedded_config_data["ray"], address="auto"),
                         serve=dict(embedded_config_data["serve"], ingress="haproxy"))
    monkeypatch.setattr(cluster_module, "running_ingress", lambda: "proxy")
    line = cluster_module.front_door_line(config)
    assert line.startswith("front door: Serve's proxy (serve.ingress: haproxy); Ray was started without") and \
        "senmon ray-env" in line, line
    monkeypatch.setattr(cluster_module, "running_ingress", lambda: "haproxy")
    assert cluster_module.front_door_line(config) == "front door: Ray's HAProxy (serve.ingress: haproxy)"

    monkeypatch.setattr(cluster_module, "running_ingress", lambda: None)  # Serve not started: nothing to compare
    assert cluster_module.front_door_line(config) == "front door: none (Serve runs no proxy) (serve.ingress: haproxy)"

    def unreachable():
        raise TimeoutError("Get timed out")

    monkeypatch.setattr(cluster_module, "running_ingress", unreachable)  # status goes on, and says so
    assert cluster_module.front_door_line(config) == \
        "front door: not known (TimeoutError: Get timed out) (serve.ingress: haproxy)"
