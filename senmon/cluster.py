"""The commands `ray up` runs on senmon's cluster nodes, written once.

`setup_commands` install senmon on a node with scripts/setup.sh (the script `make demo` and
`make test` run) and put its virtual environment on the node's PATH, so that later commands,
`ray exec` and `ray down` (which runs `ray stop` on the head) find `ray`, `serve` and `senmon`.
`head_start_ray_commands` start Ray on the head, deploy the Serve config the code builds and
start senmon's control plane (`senmon up --cluster`); `worker_start_ray_commands` join a worker.
Both run `ray start` in the environment `ray_start_environment` gives for the senmon config
(`senmon ray-env` prints it): what Ray reads only when it starts, Serve's HTTP front door.

cluster.yaml (the AWS cluster: the `gpu` extra, configs/production.example.yaml) carries exactly
these lines, which tests/test_cluster.py checks. `local_cluster` puts the same lines into a
cluster file for Ray's local provider (the head on 127.0.0.1, no workers): tests/test_ray_up.py
hands that file to a real `ray up`. The two differ only in the parameters below: the extra, the
senmon config file, and Ray's ports (a shared test machine cannot count on Ray's defaults).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from senmon.config import SenmonConfig

REPO_ON_NODE = "~/senmon"                  # file_mounts puts the repository here on every node
SERVE_CONFIG = "~/senmon-serve.yaml"      # what `senmon serve-config` writes and `serve deploy` reads
UP_LOG = "~/senmon-up.log"                # the output of `senmon up --cluster`
VENV_ON_PATH = 'export PATH="$HOME/senmon/.venv/bin:$PATH"'
RSYNC_EXCLUDE = ["**/__pycache__", "*.egg-info"]
# What a node needs of the repository, each synced on its own. Not the whole checkout: before it
# syncs anything, `ray up` hashes every file under each mounted local path, excludes or not, so
# mounting "." reads all of .venv (4 GB) and var/ each time, and a broken link there stops it.
ON_NODES = ["pyproject.toml", "README.md", "Makefile", "scripts", "configs", "data",
            "senmon", "actors", "serve", "train", "ingest"]
NOT_ON_NODES = [".ci", ".gitignore", "bench", "cluster.yaml", "docs", "tests"]  # tests/test_cluster.py: nothing else


def repository_mounts(repository: str, home: str) -> dict[str, str]:
    """file_mounts for the repository at `repository` (local) into `home`/senmon (on the node)."""
    return {f"{home}/senmon/{path}": f"{repository.rstrip('/')}/{path}" for path in ON_NODES}


@dataclass(frozen=True)
class RayPorts:
    """The head's fixed ports (Ray's defaults); every other Ray port is picked free by Ray."""

    gcs: int = 6379
    object_manager: int = 8076
    dashboard: int = 8265
    client_server: int = 10001
    dashboard_agent: int = 52365


def setup_commands(extra: str) -> list[str]:
    """Install senmon[extra] into ~/senmon/.venv (idempotent) and put that venv first on PATH."""
    return [
        f"cd {REPO_ON_NODE} && SENMON_EXTRA={extra} bash scripts/setup.sh",
        f"grep -qsF '{VENV_ON_PATH}' ~/.bashrc || echo '{VENV_ON_PATH}' >> ~/.bashrc",
    ]


def _ulimit() -> str:
    return "ulimit -n 65536 2>/dev/null || ulimit -n hard"  # 65536 open files, or as many as the user may


def ray_start_environment(config: SenmonConfig, uid: int | None = None) -> dict[str, str]:
    """The environment `ray start` needs on a node for `config`: Serve's HTTP front door (`serve.ingress`).

    Ray reads these when Serve starts, in every process of the node, so they cannot be set later. With
    HAProxy, its stats and metrics ports are the config's, and its files live in a directory of the node
    user's own (Ray's default, /tmp/haproxy-serve, belongs to whichever user made it first), named by user
    id: Ray adds the node id (56 characters) and HAProxy takes socket paths of at most 97. A stopping router
    replica drains after `serve.haproxy_drain_s`, not Ray's 30 s."""
    if config.serve.ingress != "haproxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    base = Path(f"/tmp/senmon-haproxy-{os.getuid() if uid is None else uid}")
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(config.serve.haproxy_stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(config.serve.haproxy_metrics_port),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{config.serve.haproxy_drain_s:g}",
    }


def running_ingress() -> str | None:
    """The HTTP front door Serve runs on the connected Ray: 'haproxy', 'proxy', or None while Serve runs no
    proxy. Serve's proxy actors are named SERVE_PROXY_ACTOR-<node> in its namespace, whichever class they are;
    their class says which front door it is (a look-up in the GCS: no task, no worker to start)."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE, SERVE_PROXY_NAME

    classes = set()
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == SERVE_NAMESPACE and actor["name"].startswith(SERVE_PROXY_NAME):
            try:
                handle = ray.get_actor(actor["name"], namespace=SERVE_NAMESPACE)
            except ValueError:  # gone since it was listed
                continue
            classes.add(handle._ray_actor_creation_function_descriptor.class_name)
    if not classes:
        return None
    return "haproxy" if any("HAProxy" in name for name in classes) else "proxy"


def front_door_line(config: SenmonConfig) -> str:
    """What `senmon status` and `senmon up` say of the front door; a cluster whose Ray was started without
    `senmon ray-env` while the config asks for HAProxy is named, with what to do."""
    names = {"haproxy": "Ray's HAProxy", "proxy": "Serve's proxy", None: "none (Serve runs no proxy)"}
    try:
        running = running_ingress()
    except Exception as error:  # noqa: BLE001 - status goes on without it
        why = f"{type(error).__name__}: {str(error)[:200]}"
        return f"front door: not known ({why}) (serve.ingress: {config.serve.ingress})"
    line = f"front door: {names[running]} (serve.ingress: {config.serve.ingress})"
    if running is not None and running != config.serve.ingress:
        line += ("; Ray was started without what `senmon ray-env` prints, so the config's front door is not the one "
                 "serving: restart Ray in that environment (cluster.yaml's `ray start` lines do)")
    return line


def export_lines(environment: dict[str, str]) -> str:
    """`environment` as shell `export` lines (what `senmon ray-env` prints, for `eval`)."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in environment.items())


def _ray_env(config: str) -> str:
    """Load `senmon ray-env`'s exports for `config` into the shell; a config that does not load stops the command."""
    return f'ray_env=$(cd {REPO_ON_NODE} && senmon --config {config} ray-env) && eval "$ray_env"'


def head_start_ray_commands(config: str, ports: RayPorts = RayPorts()) -> list[str]:
    """Start Ray on the head (in `ray_start_environment`), deploy the Serve config built from `config`
    (a path on the node, relative to the repository or absolute), then start `senmon up --cluster` in
    the background."""
    p = ports
    return [
        "ray stop",
        f"{_ulimit()}; {_ray_env(config)} && ray start --head --port={p.gcs} --object-manager-port={p.object_manager} "
        f"--ray-client-server-port={p.client_server} --dashboard-host=0.0.0.0 --dashboard-port={p.dashboard} "
        f"--dashboard-agent-listen-port={p.dashboard_agent} --autoscaling-config=~/ray_bootstrap_config.yaml",
        f"cd {REPO_ON_NODE} && senmon --config {config} serve-config > {SERVE_CONFIG}",
        f"serve deploy --address http://127.0.0.1:{p.dashboard} {SERVE_CONFIG}",
        f"cd {REPO_ON_NODE} && nohup senmon --config {config} up --cluster > {UP_LOG} 2>&1 < /dev/null &",
    ]


def worker_start_ray_commands(config: str, ports: RayPorts = RayPorts()) -> list[str]:
    return [
        "ray stop",
        f"{_ulimit()}; {_ray_env(config)} && ray start --address=$RAY_HEAD_IP:{ports.gcs} "
        f"--object-manager-port={ports.object_manager}",
    ]


def commands(extra: str, config: str, ports: RayPorts = RayPorts()) -> dict[str, list[str]]:
    """Every command list of a cluster file, keyed as the cluster launcher names them."""
    return {
        "initialization_commands": [],
        "setup_commands": setup_commands(extra),
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": head_start_ray_commands(config, ports),
        "worker_start_ray_commands": worker_start_ray_commands(config, ports),
    }


def local_cluster(name: str, ssh_user: str, ssh_private_key: str, repository: str, config: str,
                  extra: str = "cpu", ports: RayPorts = RayPorts(),
                  ssh_proxy_command: str | None = None, file_mounts: dict[str, str] | None = None) -> dict:
    """A cluster file for Ray's local provider: the head is this machine (127.0.0.1) reached over SSH
    as `ssh_user`, `repository` is synced to ~/senmon there (`ON_NODES`), and the nodes run `commands(extra, config)`.

    `ssh_proxy_command` reaches an sshd on another port than 22; `file_mounts` adds files. The local
    provider takes no node types: the head announces what `ray start` finds, unless the node's
    environment sets RAY_OVERRIDE_RESOURCES (what the launcher sets for cluster.yaml's node types).
    """
    home = f"/home/{ssh_user}"
    auth = {"ssh_user": ssh_user, "ssh_private_key": ssh_private_key}
    if ssh_proxy_command:
        auth["ssh_proxy_command"] = ssh_proxy_command
    return {
        "cluster_name": name,
        "max_workers": 0,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "auth": auth,
        "file_mounts": {**repository_mounts(repository, home), **(file_mounts or {})},
        "file_mounts_sync_continuously": False,
        "rsync_exclude": list(RSYNC_EXCLUDE),
        **commands(extra, config, ports),
    }
