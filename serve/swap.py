"""Live swap: move one model to another version with no failed or dropped request.

Ray Serve's own rolling update stops an old replica before its replacement starts, so a
one-replica specialist would go dark while the new engine loads. senmon swaps blue/green
instead, one Serve application per version:

1. start the new version as its own application (`senmon-law-v3`) beside the old one;
2. warm it with a real generation request through its handle;
3. point the serving table at it (every router replica picks the pointer up within ~0.2 s);
4. drain: wait until every live router replica runs on the new table and has no request left
   on the old application (`serve.drain_timeout_s` at most);
5. delete the old application (Serve's graceful shutdown lets anything still running finish).

Only that model's applications change; every other model keeps its replicas. Promotion and
rollback are the same move: the registry says which version serves, the swap makes it so.

    swap(config, "law", record)                 # record = the registry's serving record
    sync_with_registry(config, registry)        # swap every model whose serving version changed
"""

from __future__ import annotations

import logging
import time

import ray
from ray import serve

from senmon.config import SenmonConfig
from senmon.serve.specialist import ENGINE_PREFIX, app_name, build_specialist_app

log = logging.getLogger("senmon.serve")
WARM_PROMPT = "Hello"


class SwapError(RuntimeError):
    """A swap that cannot start or did not complete (the old version keeps serving)."""


def _table(config: SenmonConfig, table=None):
    from senmon.serve.table import get_or_create_table

    return table or get_or_create_table(config.serve.app_name, config.ray.namespace)


def all_models(config: SenmonConfig) -> list[str]:
    return [s.name for s in config.specialists] + [config.generalist.name]


# --------------------------------------------------------------------------- steps


def start_version(config: SenmonConfig, model: str, record: dict) -> str:
    """Deploy `record`'s version as its own application, without waiting; returns the app name."""
    name = app_name(config, model, record["version"])
    target = serve.RunTarget(build_specialist_app(config, model, record["version"], record["path"]), name=name,
                             route_prefix=None)
    serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    return name


def wait_running(names: list[str], timeout_s: float = 900.0) -> None:
    """Wait until every named application is RUNNING; SwapError if one fails to deploy."""
    deadline = time.monotonic() + timeout_s
    pending = set(names)
    while pending:
        applications = serve.status().applications
        for name in list(pending):
            status = applications.get(name)
            state = str(getattr(status, "status", ""))
            if state.endswith("RUNNING"):
                pending.discard(name)
            elif state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
                raise SwapError(f"{name} did not start: {status.message or state}")
        if pending and time.monotonic() > deadline:
            raise SwapError(f"{', '.join(sorted(pending))} not running after {timeout_s:.0f} s")
        if pending:
            time.sleep(0.5)


def warm(model: str, name: str, timeout_s: float = 300.0) -> float:
    """One real generation through the new application's handle; returns its latency in seconds."""
    from ray.serve.llm.openai_api_models import CompletionRequest

    handle = serve.get_deployment_handle(ENGINE_PREFIX + model, name).options(stream=True)
    started = time.monotonic()
    items = list(handle.completions.remote(CompletionRequest(model=model, prompt=WARM_PROMPT, max_tokens=2)))
    first = items[0][0] if items and isinstance(items[0], list) else (items[0] if items else None)
    if first is None or type(first).__name__ == "ErrorResponse":
        raise SwapError(f"{name} answered the warm-up request with an error: {first}")
    return time.monotonic() - started


def switch(config: SenmonConfig, model: str, record: dict, name: str, table=None) -> int:
    entry = {"app": name, "version": record["version"], "path": record["path"]}
    return ray.get(_table(config, table).set.remote(model, entry))


def drain(config: SenmonConfig, epoch: int, old_app: str, table=None) -> dict:
    """Wait until no router replica can still send to `old_app`; returns what was observed."""
    table = _table(config, table)
    deadline = time.monotonic() + config.serve.drain_timeout_s
    max_inflight = 0
    while True:
        state = ray.get(table.drained.remote(epoch, old_app))
        max_inflight = max(max_inflight, state["inflight"])
        if state["done"]:
            return {"drained": True, "routers": state["routers"], "max_inflight_seen": max_inflight}
        if time.monotonic() > deadline:
            log.warning("drain of %s timed out: %s", old_app, state)
            return {"drained": False, **state, "max_inflight_seen": max_inflight}
        time.sleep(0.1)


# --------------------------------------------------------------------------- the swap


def swap(config: SenmonConfig, model: str, record: dict, table=None) -> dict:
    """Serve `record` (a registry record with "version" and "path") for `model`, live; returns timings."""
    table = _table(config, table)
    if not ray.get(table.begin_swap.remote(model)):
        raise SwapError(f"a swap of {model} is already running")
    timings: dict = {"model": model, "version": record["version"]}
    started = time.monotonic()
    new_app, switched = None, False
    try:
        _, entries = ray.get(table.get.remote())
        old = entries.get(model)
        timings["from_version"] = old["version"] if old else None
        new_app = app_name(config, model, record["version"])
        if old and old["app"] == new_app:
            return {**timings, "changed": False}
        start_version(config, model, record)
        wait_running([new_app])
        timings["start_s"] = time.monotonic() - started
        timings["warm_s"] = warm(model, new_app)
        epoch = switch(config, model, record, new_app, table)
        switched = True
        timings["switched_at_s"] = time.monotonic() - started
        if old:
            timings["drain"] = drain(config, epoch, old["app"], table)
            serve.delete(old["app"])
        timings["total_s"] = time.monotonic() - started
        log.info("%s: v%s -> v%s in %.1f s", model, timings["from_version"], record["version"], timings["total_s"])
        return {**timings, "changed": True, "app": new_app}
    except Exception as error:
        if new_app and not switched and not (old and old["app"] == new_app):
            try:
                serve.delete(new_app)  # the old version keeps serving; leave nothing half started
            except Exception:
                log.exception("could not remove %s after a failed swap", new_app)
        if isinstance(error, SwapError):
            raise
        raise SwapError(f"swap of {model} to v{record['version']} failed: {error}") from error
    finally:
        ray.get(table.end_swap.remote(model))


def sync_with_registry(config: SenmonConfig, registry, table=None) -> list[dict]:
    """Swap every model whose serving version in the registry differs from what serves now."""
    table = _table(config, table)
    _, entries = ray.get(table.get.remote())
    results = []
    for model in all_models(config):
        record = ray.get(registry.current.remote(model))
        entry = entries.get(model)
        if record is not None and (entry is None or entry["version"] != record["version"]):
            results.append(swap(config, model, record, table))
    return results


# --------------------------------------------------------------------------- as Ray tasks (the admin endpoints)


@ray.remote(num_cpus=0, max_retries=0)
def run_swap_task(config: dict, model: str, record: dict, table) -> dict:
    from senmon.serve.router import as_config

    return swap(as_config(config), model, record, table)


@ray.remote(num_cpus=0, max_retries=0)
def sync_task(config: dict, registry, table) -> list[dict]:
    from senmon.serve.router import as_config

    return sync_with_registry(as_config(config), registry, table)
