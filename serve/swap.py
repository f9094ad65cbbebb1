"""Live swap: move one model to another version with no failed or dropped request.

**In place** (the default for a version with the same architecture and tokenizer as the one
serving: every retrain from the serving version, every branched specialist, every rollback
between them). The driver first checks the new checkpoint's files against the reference the
training job stored (train/reference.py) and refuses a checkpoint changed since. Then it points the model's table entry at the new weights, keeping the
application. Each engine replica (serve/engine.py) hears of the entry at once (a long poll on the table),
holds new requests, lets running ones finish, reloads the weights inside its running vLLM
engine, verifies them through the engine and reports. The swap is done when every live replica
reports the new version. A replica that cannot verify goes back to the old weights by itself;
the driver then puts the entry back and falls back to blue/green, which starts a fresh engine.

**Blue/green** (architecture changes, `serve.in_place_swap: false`, or an in-place failure).
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

import json
import logging
import time
import uuid
from pathlib import Path

import ray
from ray import serve

from senmon.config import SenmonConfig
from senmon.metrics import record_swap
from senmon.serve.specialist import ENGINE_PREFIX, app_name, build_specialist_app

log = logging.getLogger("senmon.serve")
WARM_PROMPT = "Hello"


class SwapError(RuntimeError):
    """A swap that cannot start or did not complete (the old version keeps serving)."""


def _table(config: SenmonConfig, table=None):
    from senmon.serve.table import get_or_create_table

    return table or get_or_create_table(config.serve.app_name, config.ray.namespace, config.storage_root)


def all_models(config: SenmonConfig) -> list[str]:
    return [s.name for s in config.specialists] + [config.generalist.name]


# --------------------------------------------------------------------------- steps


def start_version(config: SenmonConfig, model: str, record: dict, name: str | None = None) -> str:
    """Deploy `record`'s version as its own application, without waiting; returns the app name."""
    name = name or app_name(config, model, record["version"])
    target = serve.RunTarget(build_specialist_app(config, model, record["version"], record["path"], name), name=name,
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


def quality(record: dict) -> dict | None:
    """The version's validation perplexity per domain, which `auto` routing compares (serve/router.py)."""
    return (record.get("metrics") or {}).get("val_ppl_by_domain")


def switch(config: SenmonConfig, model: str, record: dict, name: str, table=None) -> int:
    entry = {"app": name, "version": record["version"], "path": record["path"], "quality": quality(record)}
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


# --------------------------------------------------------------------------- in place


class CheckpointRefused(SwapError):
    """The new checkpoint's files do not reproduce its reference: no engine may serve it."""


_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def _read(path: str, name: str) -> bytes | None:
    try:
        return (Path(path) / name).read_bytes()
    except OSError:
        return None


def in_place_blocker(old: dict, record: dict) -> str | None:
    """Why `record` cannot replace the weights of `old` (a table entry) in place, or None when it can:
    same model config (architecture and sizes) and the same tokenizer, both local checkpoints."""
    old_config, new_config = _read(old["path"], "config.json"), _read(record["path"], "config.json")
    if old_config is None or new_config is None:
        return "not a local checkpoint"

    def shape(raw: bytes) -> dict:
        return {k: v for k, v in json.loads(raw).items() if k not in _IGNORED_CONFIG_KEYS}

    if shape(old_config) != shape(new_config):
        return "another architecture or size"
    if _read(old["path"], "tokenizer.json") != _read(record["path"], "tokenizer.json"):
        return "another tokenizer"
    return None


def wait_engines(table, app: str, version: int, timeout_s: float) -> dict:
    """Wait until every live replica of `app` reports `version`, or one refuses it; returns what they said."""
    deadline = time.monotonic() + timeout_s
    seen_any_at = time.monotonic()
    while True:
        reports = ray.get(table.engine_reports.remote(app))
        refused = {r["replica"]: r["refused"][str(version)] for r in reports if str(version) in r.get("refused", {})}
        if refused:
            return {"done": False, "refused": refused, "replicas": len(reports)}
        if reports and all(r["version"] == version for r in reports):
            return {"done": True, "replicas": len(reports), "swaps": [r.get("last_swap") for r in reports]}
        if reports:
            seen_any_at = time.monotonic()
        elif time.monotonic() - seen_any_at > 10:
            raise SwapError(f"no replica of {app} reports to the serving table")
        if time.monotonic() > deadline:
            behind = sum(r["version"] != version for r in reports)
            raise SwapError(f"{behind} of {len(reports)} replicas of {app} not on v{version} after {timeout_s:.0f} s")
        time.sleep(0.02)


def swap_in_place(config: SenmonConfig, model: str, record: dict, old: dict, table) -> dict:
    """Move `model`'s serving application to `record`'s weights without a new engine; returns timings.

    Raises CheckpointRefused when the files do not reproduce their reference, SwapError when a replica
    refused or did not move (the entry is then back on the old weights, which the replicas serve)."""
    from senmon.train.reference import check_checkpoint, load_reference

    started = time.monotonic()
    reference = load_reference(record["path"])
    problem = check_checkpoint(record["path"], reference, config.serve.reference_tolerance)
    if problem:
        raise CheckpointRefused(f"{model} v{record['version']} refused: {problem}")
    checked = time.monotonic() - started
    entry = {**old, "version": record["version"], "path": record["path"], "reference": reference,
             "quality": quality(record)}
    ray.get(table.set.remote(model, entry))
    timeout = config.serve.drain_timeout_s + 30
    try:
        result = wait_engines(table, old["app"], record["version"], timeout)
    except SwapError:  # replicas did not report in time: point back at the weights that verified
        ray.get(table.set.remote(model, old))
        raise
    if not result["done"]:
        ray.get(table.set.remote(model, old))  # the refusing replicas already went back; the others follow
        try:
            wait_engines(table, old["app"], old["version"], timeout)
        except SwapError:
            log.warning("%s: not every replica back on v%s yet", model, old["version"])
        reason = next(iter(result["refused"].values()))
        raise SwapError(f"{model} v{record['version']} refused by {len(result['refused'])} of "
                        f"{result['replicas']} replicas: {reason}")
    return {"kind": "in_place", "check_s": round(checked, 3), "replicas": result["replicas"],
            "replica_swaps": result["swaps"], "app": old["app"]}


# --------------------------------------------------------------------------- the swap


def swap(config: SenmonConfig, model: str, record: dict, table=None, holder: str | None = None) -> dict:
    """Serve `record` (a registry record with "version" and "path") for `model`, live; returns timings.
    `holder` names who swaps (the scheduler's run id): the same holder may take over its own swap guard
    from a process that died in the middle of the swap (serve/table.py, `begin_swap`)."""
    table = _table(config, table)
    if not ray.get(table.begin_swap.remote(model, holder)):
        raise SwapError(f"a swap of {model} is already running")
    timings: dict = {"model": model, "version": record["version"]}
    started = time.monotonic()
    new_app, switched = None, False
    try:
        _, entries = ray.get(table.get.remote())
        old = entries.get(model)
        timings["from_version"] = old["version"] if old else None
        if old and old["version"] == record["version"]:
            return {**timings, "changed": False}
        if old and config.serve.in_place_swap:
            blocker = in_place_blocker(old, record)
            if blocker is None:
                try:
                    result = swap_in_place(config, model, record, old, table)
                    timings["total_s"] = time.monotonic() - started
                    log.info("%s: v%s -> v%s in place in %.2f s", model, old["version"], record["version"],
                             timings["total_s"])
                    record_swap(model, "in_place", "done", timings["total_s"])
                    return {**timings, **result, "changed": True}
                except CheckpointRefused:
                    raise
                except SwapError as error:  # a replica could not load or verify: a fresh engine may
                    timings["in_place_error"] = str(error)
                    log.warning("%s: in-place swap failed (%s); starting v%s beside v%s", model, error,
                                record["version"], old["version"])
            else:
                timings["in_place_skipped"] = blocker
        new_app = app_name(config, model, record["version"])
        if old and old["app"] == new_app:  # that application now serves other weights (an in-place swap)
            new_app = f"{new_app}-{uuid.uuid4().hex[:6]}"
        start_version(config, model, record, new_app)
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
        record_swap(model, "blue_green", "done", timings["total_s"])
        return {**timings, "kind": "blue_green", "changed": True, "app": new_app}
    except Exception as error:
        record_swap(model, "blue_green" if new_app else "in_place",
                    "refused" if isinstance(error, CheckpointRefused) else "failed", time.monotonic() - started)
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


def swap_or_restore(config: SenmonConfig, model: str, record: dict, previous: int | None, registry,
                    table=None, holder: str | None = None) -> dict:
    """`swap` after the registry promoted `record`; when the swap fails, the registry marks the version
    rejected with the reason and names `previous` serving again, so it says what actually serves."""
    try:
        return swap(config, model, record, table, holder)
    except SwapError as error:
        if previous is None:  # the version this promotion or rollback replaced
            replaced = {f"replaced by v{record['version']}", f"rolled back to v{record['version']}"}
            previous = next((r["version"] for r in ray.get(registry.history.remote(model))
                             if r.get("reason") in replaced), None)
        ray.get(registry.refuse.remote(model, record["version"], str(error), previous))
        raise


# --------------------------------------------------------------------------- as Ray tasks (the admin endpoints)


@ray.remote(num_cpus=0, max_retries=0)
def run_swap_task(config: dict, model: str, record: dict, table, registry=None, previous: int | None = None) -> dict:
    from senmon.serve.router import as_config

    if registry is None:
        return swap(as_config(config), model, record, table)
    return swap_or_restore(as_config(config), model, record, previous, registry, table)


@ray.remote(num_cpus=0, max_retries=0)
def sync_task(config: dict, registry, table) -> list[dict]:
    from senmon.serve.router import as_config

    return sync_with_registry(as_config(config), registry, table)
