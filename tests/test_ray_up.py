"""`ray up` for real: the cluster path of cluster.yaml run end to end on this machine.

The cluster file is senmon/cluster.py's local-provider one: the same setup and start commands as
cluster.yaml, the head at 127.0.0.1 reached over SSH as an unprivileged user of the test's own
(tests/local_node.py), no workers. `ray up -y` syncs this repository to that user's home, runs
scripts/setup.sh there (a fresh virtual environment, the cpu extra), starts Ray, deploys the Serve
config the code builds and starts `senmon up --cluster` with a CI-size copy of
configs/production.example.yaml: `ray.address: auto`, `kafka.embedded: false` with the test's broker
standing in for the external Kafka, and a file-system storage root. Then one /v1/completions request
through the head's HTTP port, `senmon status` and `senmon history` through `ray exec`, a few
documents through the configured Kafka into the dataset store, and `ray down`, after which the
test user runs no process at all. Each step's time is printed (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from senmon.cluster import RayPorts, local_cluster
from senmon.ingest.broker import EmbeddedBroker, free_port
from local_node import Sshd, as_root, ensure_user, install_file, keygen, kill_user_processes, user_processes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
USER = "senmon-ray"                                  # the cluster's ssh_user; its processes are the cluster's
TINY_SERVING = {"max_model_len": 64}
FIRST_ANSWER_TIMEOUT_S = 480                         # training two tiny models, then two engine starts
STORAGE = "senmon-storage"                           # the storage root, in the user's home
MODEL_ROW = re.compile(r"^(\S+)\s+v(\d+)\s", re.M)   # `senmon status`: "law  v1  23.4  ..."


def ci_config(home: str, broker: str, http_port: int, topic_suffix: str) -> dict:
    """configs/production.example.yaml at CI size: what changes is the Kafka it points at, the
    storage root, the HTTP port and the sizes; `ray.address: auto` and `kafka.embedded: false` stay."""
    data = yaml.safe_load((REPO / "configs" / "production.example.yaml").read_text(encoding="utf-8"))
    embedded = yaml.safe_load((REPO / "configs" / "embedded.yaml").read_text(encoding="utf-8"))
    assert data["ray"]["address"] == "auto" and data["kafka"]["embedded"] is False
    kafka = {k: v for k, v in data["kafka"].items() if not k.startswith(("sasl_", "ssl_"))}
    kafka.update(bootstrap_servers=[broker], security_protocol="PLAINTEXT",
                 topics={"documents": f"senmon.documents.{topic_suffix}", "dead_letter": f"senmon.dead-letter.{topic_suffix}",
                         "partitions": 3, "replication_factor": 1})
    specialists = [dict(s, serving=TINY_SERVING, schedule={"interval": "1d", "min_new_documents": 100000})
                   for s in embedded["specialists"] if s["name"] == "law"]  # one specialist: the path, not the count
    return dict(
        data, name="senmon-ray-up", storage_root=f"{home}/{STORAGE}", corpus_dir=f"{home}/senmon/data/corpus",
        routing_dir=f"{home}/senmon/data/routing",
        kafka=kafka, ingest=dict(data["ingest"], actors=1, flush_interval_s=0.5, actor_num_cpus=0.25),
        http=dict(data["http"], host="127.0.0.1", port=http_port),
        # the production config's front door, HAProxy, on ports free here (a test machine cannot count on 8404 and 9101)
        serve=dict(data["serve"], router_replicas=1, cpu_kv_cache_mib=64, cpus_per_engine=0.5,
                   haproxy_stats_port=free_port(), haproxy_metrics_port=free_port()),
        # specialists from scratch: the generalist and law train at once (branching is tests/test_train.py's)
        training={"vocab_size": 1024, "seq_len": 64, "batch_size": 8, "epochs": 1, "learning_rate": 0.003,
                  "promotion_margin": 0.01, "num_workers": 1, "cpus_per_worker": 1, "use_gpu": False,
                  "specialists_from": "scratch"},
        generalist=dict(embedded["generalist"], serving=TINY_SERVING),
        specialists=specialists,
    )


def node_environment(api_key: str, ray_tmpdir: str) -> str:
    """The node's login environment (what a cloud image or its secrets manager provides): where Ray
    keeps its sessions, the logical CPUs the head announces (as cluster.yaml's head node type makes
    the launcher announce 8; the local provider has no node types), the API key the router checks,
    and this machine's package mirror for pip."""
    lines = [f"export RAY_TMPDIR={ray_tmpdir}", """export RAY_OVERRIDE_RESOURCES='{"CPU":8}'""",
             f"export SENMON_API_KEYS={api_key}", "export RAY_USAGE_STATS_ENABLED=0"]
    lines += [f"export {k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("PIP_") and " " not in v]
    return "\n".join(lines) + "\n"


class Steps:
    """Wall time of each step, printed at the end."""

    def __init__(self):
        self.started = time.monotonic()
        self.times: dict[str, float] = {}

    def timed(self, name: str, fn, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.times[name] = time.monotonic() - t0

    def report(self) -> str:
        rows = [f"  {name:<44} {seconds:7.1f} s" for name, seconds in self.times.items()]
        return "\n".join(["ray up test, step times:", *rows,
                          f"  {'total':<44} {time.monotonic() - self.started:7.1f} s"])


def run_launcher(args: list[str], env: dict, log: Path, timeout_s: float) -> list[tuple[float, str]]:
    """Run `ray <args>`; returns its output lines with the seconds since start of each (also in `log`)."""
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen([RAY, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL, errors="replace") as process, log.open("a") as out:
        out.write(f"$ ray {' '.join(args)}\n")
        for line in process.stdout:
            lines.append((time.monotonic() - started, line.rstrip()))
            out.write(f"{lines[-1][0]:8.1f} {line}")
            out.flush()
            if time.monotonic() - started > timeout_s:
                process.kill()
                raise AssertionError(f"ray {args[0]} ran over {timeout_s:.0f} s; see {log}")
        process.wait()
    if process.returncode != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise AssertionError(f"ray {' '.join(args[:1])} exited with {process.returncode}:\n{tail}")
    return lines


def phase_times(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Split `ray up`'s output at its numbered steps ([2/7] Processing file mounts, ...) and at the
    ends of `ray start` and `serve deploy`, which both run in its last step."""
    marks: list[tuple[float, str]] = []
    for t, line in lines:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # the launcher's colours
        step = re.search(r"\[(\d)/7\]\s*(.*)", line)
        if step:
            marks.append((t, f"ray up [{step.group(1)}/7] {step.group(2).strip()}"))
        elif "Ray runtime started" in line:
            marks.append((t, "  after ray start: serve-config + serve deploy"))
        elif "Sent deploy request successfully" in line:
            marks.append((t, "  after serve deploy: rest of ray up"))
    end = lines[-1][0] if lines else 0.0
    return {name: (marks[i + 1][0] if i + 1 < len(marks) else end) - t for i, (t, name) in enumerate(marks)}


def wait_for_answer(url: str, api_key: str, up_log: Path, state: Path, timeout_s: float) -> httpx.Response:
    """Once `senmon up` is up (its `state` record written), poll /v1/completions until a model answers
    (200); fail early when `senmon up` is gone. (The router `serve deploy` started answers as soon
    as an engine is in the serving table, before `senmon up` is done.)"""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        running = [p for p in user_processes(USER) if "up --cluster" in p]
        if not running:
            raise AssertionError(f"senmon up --cluster is not running; its log:\n{read_tail(up_log)}")
        if not state.exists():
            time.sleep(2)
            continue
        try:
            response = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {api_key}"},
                                  json={"model": "law", "prompt": "Permission is hereby granted", "max_tokens": 8,
                                        "temperature": 0.8, "seed": 0}, timeout=60)
            if response.status_code == 200:
                return response
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}: {error}"
        time.sleep(3)
    raise AssertionError(f"no answer within {timeout_s:.0f} s ({last}); senmon up's log:\n{read_tail(up_log)}")


def read_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"({error})"


def wait_until_gone(user: str, timeout_s: float) -> list[str]:
    """Wait for `user` to run nothing; returns what still runs at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (left := user_processes(user)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


@pytest.fixture()
def node(tmp_path):
    """The test user's node, reachable over SSH; everything the user runs is ended afterwards."""
    steps = Steps()
    home = str(steps.timed("create the user, keys", ensure_user, USER))
    assert Path("/usr/sbin/sshd").exists() and subprocess.run(["which", "rsync"], capture_output=True).returncode == 0, \
        "openssh-server and rsync are missing: run scripts/ssh_host.sh (make test does)"
    # a cluster left by an interrupted earlier run would make `ray up` think the head is up to date,
    # and an earlier run's storage root would spare this one the training of the first versions
    kill_user_processes(USER)
    subprocess.run(as_root(["rm", "-rf", f"{home}/{STORAGE}", f"{home}/.senmon"]), check=True)
    key = keygen(tmp_path / "id_ed25519")
    install_file(USER, key.with_suffix(".pub").read_text(), f"{home}/.ssh/authorized_keys")
    api_key = secrets.token_urlsafe(16)
    ray_tmpdir = f"/tmp/ray-{USER}"  # the node's Ray sessions: the last run's logs stay until the next run
    subprocess.run(as_root(["rm", "-rf", ray_tmpdir]), check=True)
    install_file(USER, node_environment(api_key, ray_tmpdir), f"{home}/.senmon-node-env", mode="644")
    bashrc = Path(home, ".bashrc").read_text() if os.access(f"{home}/.bashrc", os.R_OK) else ""
    source = "[ -f ~/.senmon-node-env ] && . ~/.senmon-node-env"
    if source not in bashrc:
        install_file(USER, source + "\n" + bashrc, f"{home}/.bashrc", mode="644")  # before bashrc's non-interactive return
    for name in ("pip.conf",):  # this machine's pip configuration (its package mirror), as the node's
        mine = Path.home() / ".config" / "pip" / name
        if mine.exists():
            install_file(USER, mine.read_text(), f"{home}/.config/pip/{name}", mode="644")
    sshd = Sshd(tmp_path, USER, free_port())
    steps.timed("start sshd", sshd.start)
    info = {"home": home, "key": str(key), "api_key": api_key, "sshd": sshd, "steps": steps, "tmp": tmp_path}
    try:
        yield info
    finally:
        sshd.stop()
        kill_user_processes(USER)  # whatever the test's own checks found left over (they fail the test)
        print("\n" + steps.report())
        from reliability import record_figure  # var/reliability/test_ray_up.json: where a run's time went

        record_figure("test_ray_up", {"steps_s": {name: round(s, 1) for name, s in steps.times.items()},
                                      "total_s": round(time.monotonic() - steps.started, 1)})
        assert not wait_until_gone(USER, 10), user_processes(USER)


def test_ray_up_runs_the_cluster_commands_end_to_end(node, tmp_path):
    from kafka import KafkaAdminClient

    from senmon.actors.registry import serving_records_from_file
    from senmon.config import parse_config
    from senmon.ingest.producer import produce_file
    from senmon.ingest.store import DatasetStore

    steps, home = node["steps"], node["home"]
    ports = RayPorts(gcs=free_port(), object_manager=free_port(), dashboard=free_port(), client_server=free_port(),
                     dashboard_agent=free_port())
    launcher_env = dict(os.environ, RAY_TMPDIR=str(tmp_path / "launcher"), RAY_USAGE_STATS_ENABLED="0")
    log = tmp_path / "launcher.log"
    with EmbeddedBroker(log_dir=tmp_path / "broker") as broker:  # stands in for the external Kafka
        data = ci_config(home, broker.bootstrap, free_port(), secrets.token_hex(4))
        config_file = tmp_path / "senmon-ray-up.yaml"
        config_file.write_text(yaml.safe_dump(data, sort_keys=False))
        config_on_node = f"{home}/senmon-ray-up.yaml"
        cluster = local_cluster(f"senmon-ray-up-{secrets.token_hex(3)}", USER, node["key"], str(REPO), config_on_node,
                                extra="cpu", ports=ports, ssh_proxy_command=node["sshd"].proxy_command(),
                                file_mounts={config_on_node: str(config_file)})
        cluster_file = tmp_path / "cluster.yaml"
        cluster_file.write_text(yaml.safe_dump(cluster, sort_keys=False))
        up_log = Path(home, "senmon-up.log")
        brokers_seen: list[str] = []
        try:
            lines = steps.timed("ray up -y (until it returns)", run_launcher,
                                ["up", "-y", "--no-config-cache", str(cluster_file)], launcher_env, log, 600)
            steps.times.update(phase_times(lines))

            url = f"http://127.0.0.1:{data['http']['port']}"
            state_file = Path(home, ".senmon", "up-senmon-ray-up.json")
            answer = steps.timed("senmon up --cluster: up, and the first answer", wait_for_answer, url,
                                 node["api_key"], up_log, state_file, FIRST_ANSWER_TIMEOUT_S)
            brokers_seen += [p for p in user_processes(USER) if "tansu" in p]
            assert answer.headers["x-senmon-specialist"] == "law" and "text" in answer.json()["choices"][0]
            unauthorised = httpx.post(f"{url}/v1/completions", json={"model": "law", "prompt": "x", "max_tokens": 1})
            assert unauthorised.status_code == 401  # the key came from the node's environment
            # serve.ingress: haproxy: `ray start` ran in `senmon ray-env`'s environment, so HAProxy, not Serve's
            # Python proxy, serves the HTTP port, its stats page on the configured port and its files in the user's
            # own directory
            assert data["serve"]["ingress"] == "haproxy"
            haproxies = [p for p in user_processes(USER) if re.search(r"\bhaproxy\b", p.split()[1])]
            uid = subprocess.run(["id", "-u", USER], capture_output=True, text=True, check=True).stdout.strip()
            assert haproxies and all(f"/tmp/senmon-haproxy-{uid}/" in p for p in haproxies), user_processes(USER)
            stats = httpx.get(f"http://127.0.0.1:{data['serve']['haproxy_stats_port']}/stats", timeout=30)
            assert stats.status_code == 200 and "HAProxy" in stats.text, stats.text[:300]

            status = steps.timed("ray exec senmon status", run_launcher, [
                "exec", str(cluster_file), f"cd ~/senmon && senmon --config {config_on_node} status"],
                launcher_env, log, 180)
            printed = "\n".join(line for _, line in status)
            assert "senmon is up since" in printed, printed
            assert "front door: Ray's HAProxy (serve.ingress: haproxy)" in printed, printed  # what Ray runs, asked
            assert "front door: Ray's HAProxy (serve.ingress: haproxy)" in up_log.read_text(), read_tail(up_log)
            assert set(dict(MODEL_ROW.findall(printed))) == {"generalist", "law"}, printed

            # ray.address: auto joined the cluster that `ray up` started, the one Ray of this user
            state = json.loads(state_file.read_text())
            assert state["ray_address"].endswith(f":{ports.gcs}"), state
            assert len([p for p in user_processes(USER) if "gcs_server" in p]) == 1
            # a command that joins the cluster leaves it up on exit: the system still answers after it
            history = steps.timed("ray exec senmon history law", run_launcher, [
                "exec", str(cluster_file), f"cd ~/senmon && senmon --config {config_on_node} history law"],
                launcher_env, log, 180)
            assert any(re.search(r"law v1: serving", line) for _, line in history), history
            again = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {node['api_key']}"},
                               json={"model": "generalist", "prompt": "Once upon", "max_tokens": 4}, timeout=60)
            assert again.status_code == 200 and again.headers["x-senmon-specialist"] == "generalist"

            # kafka.embedded: false: the test's broker holds senmon's topics, and documents produced
            # there reach the dataset store in the storage root
            admin = KafkaAdminClient(bootstrap_servers=[broker.bootstrap])
            try:
                assert {data["kafka"]["topics"]["documents"], data["kafka"]["topics"]["dead_letter"]} <= set(
                    admin.list_topics())
            finally:
                admin.close()
            docs = tmp_path / "docs.jsonl"
            ids = [f"ray-up-{i}" for i in range(20)]
            docs.write_text("".join(json.dumps({"id": i, "domain": "law", "source": "test", "text":
                                                f"Licence term {i}: redistribution permitted."}) + "\n" for i in ids))
            config = parse_config(data, source="ci")
            assert steps.timed("produce 20 documents", produce_file, config, docs).sent == 20
            store = DatasetStore(data["storage_root"])
            deadline = time.monotonic() + 60
            while not set(ids) <= store.ids("law") and time.monotonic() < deadline:
                time.sleep(1)
            assert set(ids) <= store.ids("law")
            brokers_seen += [p for p in user_processes(USER) if "tansu" in p]
            assert not brokers_seen, brokers_seen  # no embedded broker on the cluster

            # the storage root is the one Ray Train and the registry share
            serving = serving_records_from_file(data["storage_root"], ["generalist", "law"])
            paths = [record["path"] for record in serving.values()]
            assert len(paths) == 2 and all(p.startswith(f"{data['storage_root']}/checkpoints/") for p in paths), serving
            assert all(Path(p).exists() for p in paths)
        except BaseException:
            print(f"\n--- launcher log tail ({log}):\n{read_tail(log, 80)}\n--- senmon up log tail:\n{read_tail(up_log)}")
            raise
        finally:
            # the README's order: `senmon down` first (a driver outside Ray's process tree, which `ray stop` leaves
            # to wait out Ray's 60 s GCS timeout), then `ray down`
            down_error = None
            try:
                steps.timed("ray exec senmon down", run_launcher, [
                    "exec", str(cluster_file), f"cd ~/senmon && senmon --config {config_on_node} down"],
                    launcher_env, log, 120)
            except AssertionError as error:
                down_error = error
            # `senmon down` returns once `senmon up` has stopped (with HAProxy, Serve's shutdown waits
            # serve.haproxy_drain_s), not when it starts stopping
            deadline = time.monotonic() + 5  # the record goes just before the process exits
            while (up_after_down := [p for p in user_processes(USER) if "up --cluster" in p and "python" in p.split()[1]]) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            try:
                steps.timed("ray down -y", run_launcher, ["down", "-y", str(cluster_file)], launcher_env, log, 300)
            finally:
                left = steps.timed("wait until the user runs nothing", wait_until_gone, USER, 90)
        assert down_error is None, down_error
        assert not up_after_down, up_after_down
        assert not left, f"left running after ray down: {left}"
