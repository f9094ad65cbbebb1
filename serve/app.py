"""Entry points of the query path: deploy the router and every serving model, and take them down.

    from senmon.serve.app import deploy, shutdown, build_serve_config
    served = deploy(config, registry)     # Ray must be up (senmon.stack.start_stack)
    served.url                            # "http://127.0.0.1:8000" -> /v1/chat/completions, ...
    served.handle                         # Serve handle of the router (see serve/router.py)
    shutdown(config)                      # remove senmon's applications (and Serve if nothing else runs)

`deploy(config, registry)` starts Serve's HTTP proxy on `http.host:http.port` (127.0.0.1 only
when no API key is configured), trains the routing model if the storage root has none, starts
one application per model (each specialist and the generalist) that has a serving version in
the registry, all at once, with the router beside them as the application `serve.app_name` on
route `/`; then it warms each engine with a real request, points the serving table at them, and
returns once the router's replicas have read that table. Calling it again
brings changed models up to date through live swaps (serve/swap.py) and leaves the rest.

`build_serve_config(config, config_path)` returns the same applications as a Serve config
(the dict that `serve deploy` takes as YAML): the router built from the import path
`senmon.serve.app:build_router` with args `{"config": config_path}`, and one
`senmon.serve.app:build_specialist` application per serving model. Keys are then read from
the cluster's environment (`$SENMON_API_KEYS`, `$SENMON_ADMIN_KEYS`) or the config file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve

from senmon.config import ROUTER_REPLICA_CPUS, SenmonConfig
from senmon.actors.registry import serving_records_from_file
from senmon.serve.auth import bind_host
from senmon.serve.router import Router, as_config
from senmon.serve.specialist import app_name, build_specialist_app
from senmon.serve.swap import all_models, start_version, switch, sync_with_registry, wait_running, warm
from senmon.serve.table import get_or_create_table, get_table

log = logging.getLogger("senmon.serve")
ROUTER_DEPLOYMENT = "router"


@dataclass
class Served:
    """What `deploy` brought up."""

    url: str
    handle: Any  # DeploymentHandle of the router
    app_name: str
    models: dict[str, int] = field(default_factory=dict)  # model -> serving version
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- application builders


def router_app(config: SenmonConfig, registry: Any = None, table: Any = None, config_arg: Any = None):
    """The router as a bound application; `config_arg` (a path or a mapping) is what its replicas parse."""
    deployment = serve.deployment(
        Router, name=ROUTER_DEPLOYMENT, num_replicas=config.serve.router_replicas, max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": ROUTER_REPLICA_CPUS}, health_check_period_s=5, graceful_shutdown_timeout_s=30,
    )
    return deployment.bind(config_arg if config_arg is not None else config.model_dump(mode="json"), registry, table)


def build_router(args: dict):
    """Serve config builder: `{"config": path, "registry": actor name (optional)}`."""
    config = as_config(args["config"])
    return router_app(config, args.get("registry"), None, args["config"])


def build_specialist(args: dict):
    """Serve config builder: `{"config": path, "model": name, "version": N, "path": checkpoint}`."""
    config = as_config(args["config"])
    return build_specialist_app(config, args["model"], int(args["version"]), args["path"])


def _serving_records(config: SenmonConfig, registry) -> dict[str, dict]:
    records = {}
    for model in all_models(config):
        record = ray.get(registry.current.remote(model)) if registry is not None else None
        if record is not None:
            records[model] = record
    return records


def build_serve_config(config: SenmonConfig, config_path: str | Path | None = None,
                       registry: Any = None) -> dict:
    """A Serve config (YAML-able dict for `serve deploy`) that builds what `deploy` builds.

    `config_path` is the config file as the cluster sees it (default: the embedded config's path
    is not assumed; without a path the config is embedded in the args as a mapping). Serving
    versions come from `registry` (an actor handle) or else from the registry's file.
    """
    arg = str(config_path) if config_path is not None else config.model_dump(mode="json")
    records = _serving_records(config, registry) if registry is not None else serving_records_from_file(config.storage_root, all_models(config))
    applications = [{"name": config.serve.app_name, "route_prefix": "/",
                     "import_path": "senmon.serve.app:build_router", "args": {"config": arg}}]
    for model, record in records.items():
        applications.append({
            "name": app_name(config, model, record["version"]), "route_prefix": None,
            "import_path": "senmon.serve.app:build_specialist",
            "args": {"config": arg, "model": model, "version": record["version"], "path": record["path"]},
        })
    return {"proxy_location": "EveryNode",
            "http_options": {"host": bind_host(config.http), "port": config.http.port},
            "applications": applications}


# --------------------------------------------------------------------------- deploy / shutdown


def _ensure_routing_model(config: SenmonConfig) -> None:
    """Train the routing model when there is none, when the specialists changed, or when the saved one lacks the
    embedding view train_router now adds (saved before 28 Nov) or was trained with other embedding weights, or has
    a `none` class where the config's routing_dir has no text of no domain, or lacks one where it has (28 Nov)."""
    from senmon.config import NO_DOMAIN
    from senmon.ingest.routing_texts import read_routing_texts
    from senmon.ingest.store import DatasetStore
    from senmon.train.embedding import EmbeddingMissing
    from senmon.train.routing import DEFAULT_EMBEDDING, load_router, train_router

    try:
        existing = load_router(config.storage_root)
    except EmbeddingMissing as error:
        log.warning("retraining the routing model: %s", error)
        existing = None
    labels = set(existing.labels) if existing is not None else set()
    outdated = existing is not None and DEFAULT_EMBEDDING is not None and len(labels) > 1 \
        and "embedding" not in existing.meta
    with_none = config.routing_dir is not None and bool(read_routing_texts(config.routing_dir, {NO_DOMAIN}))
    outdated = outdated or (existing is not None and (NO_DOMAIN in labels) != with_none)
    if existing is None or outdated or labels - {NO_DOMAIN} != {s.name for s in config.specialists}:
        started = time.monotonic()
        train_router(config, DatasetStore(config.storage_root))
        log.info("routing model trained in %.1f s", time.monotonic() - started)


SERVE_START_ATTEMPTS = 3


def worth_retrying(error: BaseException) -> bool:
    """Whether a failed `serve.start` may succeed when tried again.

    Under load Ray can kill Serve's controller or HTTP proxy actor before it runs (`ActorDiedError`
    that is not an error of its constructor), find it unavailable for a moment, or the proxy may
    not answer within Serve's timeout (`TimeoutError`). A proxy whose constructor raised (its port
    taken, a bad option) fails the same way each time, and so does anything else.
    """
    if isinstance(error, ray.exceptions.ActorDiedError):
        return not error.actor_init_failed
    return isinstance(error, (ray.exceptions.ActorUnavailableError, TimeoutError))


def start_serve(http_options: dict, *, attempts: int = SERVE_START_ATTEMPTS, start=None, stop=None,
                sleep=time.sleep, pause_s: float = 2.0) -> None:
    """`serve.start(http_options=...)`, tried up to `attempts` times while it fails in a way
    `worth_retrying`; before each retry what the failed start left (Serve's controller and proxies)
    is shut down, and the next try waits `pause_s` more. The last error, or one not worth retrying,
    is raised. `start`, `stop` and `sleep` are for tests (default: serve.start, serve.shutdown)."""
    start = start or (lambda: serve.start(http_options=http_options))
    stop = stop or serve.shutdown
    for attempt in range(1, attempts + 1):
        try:
            start()
            return
        except Exception as error:
            if attempt == attempts or not worth_retrying(error):
                raise
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            log.warning("starting Serve failed (%s: %s); trying again (%d of %d)", type(error).__name__,
                        first_line[:200], attempt + 1, attempts)
            try:
                stop()
            except Exception:  # nothing left to stop, or Ray will clean it up with the next start
                log.debug("shutting down the failed Serve start failed", exc_info=True)
            sleep(pause_s * attempt)


def routers_caught_up(table, replicas: int, timeout_s: float = 60.0) -> None:
    """Wait until `replicas` router replicas report the serving table's current epoch (they poll it every
    0.2 s); a router started beside the engines may have read the table before the last `switch`."""
    epoch, _ = ray.get(table.get.remote())
    deadline = time.monotonic() + timeout_s
    while True:
        state = ray.get(table.drained.remote(epoch, ""))
        if state["done"] and state["routers"] >= replicas:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"router replicas not at the serving table's epoch {epoch} after {timeout_s:.0f} s: {state}")
        time.sleep(0.1)


def deploy(config: SenmonConfig, registry, *, timeout_s: float = 900.0) -> Served:
    """Deploy the router and every model with a serving version; returns URL and handle.

    Needs a connected Ray (`senmon.stack.start_stack`). `registry` is the registry actor
    (`senmon.actors.registry.get_or_create_registry`). Blocks until every engine answered a
    warm-up request and the router is running.
    """
    timings: dict[str, float] = {}
    started = time.monotonic()
    if not config.ray.log_to_driver:  # Serve LLM's module loggers exist once it is imported; quiet them too
        import ray.serve.llm  # noqa: F401

        from senmon.stack import quiet_driver_logs

        quiet_driver_logs()
    host = bind_host(config.http)
    start_serve({"host": host, "port": config.http.port})
    _ensure_routing_model(config)
    table = get_or_create_table(config.serve.app_name, config.ray.namespace, config.storage_root)
    records = _serving_records(config, registry)
    _, entries = ray.get(table.get.remote())

    fresh = {m: r for m, r in records.items() if m not in entries}
    names = {m: start_version(config, m, r) for m, r in fresh.items()}
    # the router starts beside the engines (its replica's start is 10-20 s of imports); until the table names an
    # engine it answers that model's requests with 503 and Retry-After, and nobody has the URL before we return
    api_keys, admin_keys = config.http.resolved_keys()  # resolved here: replicas may not see this environment
    resolved = config.model_copy(update={"http": config.http.model_copy(update={
        "api_keys": api_keys, "admin_keys": admin_keys, "api_keys_env": None, "admin_keys_env": None})})
    serve.run_many([serve.RunTarget(router_app(resolved, registry, table), name=config.serve.app_name,
                                    route_prefix="/")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    wait_running(list(names.values()), timeout_s)
    timings["engines_up_s"] = time.monotonic() - started
    for model, name in names.items():
        warm(model, name)
        switch(config, model, fresh[model], name, table)
    timings["engines_warm_s"] = time.monotonic() - started
    if len(fresh) < len(records):  # a second deploy: swap what changed since
        sync_with_registry(config, registry, table)
    wait_running([config.serve.app_name], max(timeout_s - (time.monotonic() - started), 60.0))
    routers_caught_up(table, config.serve.router_replicas)
    handle = serve.get_app_handle(config.serve.app_name)
    timings["total_s"] = time.monotonic() - started
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{config.http.port}"
    open_note = "" if api_keys else " (no API keys: open, loopback only)"
    log.warning("senmon serving on %s%s: %s", url, open_note,
                ", ".join(f"{m} v{r['version']}" for m, r in records.items()) or "no model has a serving version")
    return Served(url, handle, config.serve.app_name, {m: r["version"] for m, r in records.items()}, timings)


def shutdown(config: SenmonConfig | None = None) -> None:
    """Delete the router and every `<app_name>-*` application; stop Serve when nothing else runs."""
    prefix = config.serve.app_name if config is not None else "senmon"
    namespace = config.ray.namespace if config is not None else None
    try:
        applications = serve.status().applications
    except Exception:  # Serve is not running
        return
    mine = [n for n in applications if n == prefix or n.startswith(prefix + "-")]
    if not set(applications) - set(mine):
        serve.shutdown()  # nothing else runs: every application goes at once, not one after another
    else:
        for name in mine:
            serve.delete(name, _blocking=False)
        deadline = time.monotonic() + 180
        while set(mine) & set(serve.status().applications) and time.monotonic() < deadline:
            time.sleep(0.5)
    try:
        ray.kill(get_table(prefix, namespace))
    except ValueError:
        pass
