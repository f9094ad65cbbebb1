"""Control-plane faults on a real local Ray: the serving table, the registry and the scheduler, each
killed (`ray.kill(actor, no_restart=False)`: the process dies, Ray restarts the actor) in the middle of
its work. Each test checks that nothing durable was lost, torn or doubled, and writes how long the
recovery took to var/reliability/<test>.json (tests/reliability.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import ray

from reliability import record_figure

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=RESTART_DEADLINE_S)


RESTART_DEADLINE_S = 120  # a restart not answered by then hangs; how long one takes is a figure, not a test


def _restarted(actor, old_pid: int, started: float) -> tuple[float, int]:
    """Seconds from `started` (the kill) until the actor answers from a new process, and its pid. (`ray.kill`
    returns at once: the old process may still answer a call or two.) Calls queued before are answered first.

    How long depends on the host's load more than on senmon: Ray starts the new worker at nice 15, so
    processes at nice 0 (a test's driver, the broker, HAProxy, GCS and raylet) come first. Here a restart took
    0.5-1.0 s with the cores idle or busy at nice 15, 13-16 s beside four busy loops at nice 0, and once
    31.6 s in CI. So the deadline only tells a hang from a slow start."""
    while True:
        pid = _pid(actor)
        if pid != old_pid:
            return time.monotonic() - started, pid
        assert time.monotonic() - started < RESTART_DEADLINE_S, f"no restart within {RESTART_DEADLINE_S} s"
        time.sleep(0.005)


# ----------------------------------------------------------------------------- the serving table


def test_serving_table_restarts_with_its_pointers(ray_local, tmp_path):
    from senmon.serve.table import get_or_create_table

    root, app = str(tmp_path / "storage"), f"faults-{uuid.uuid4().hex[:8]}"
    table = get_or_create_table(app, storage_root=root)
    # After an in-place swap the application named -v1 serves version 2: not recomputable from the registry.
    law = {"app": f"{app}-law-v1", "version": 2, "path": "/ckpt/law/2", "reference": {"logprobs": [-1.5, -2.0]}}
    code = {"app": f"{app}-code-v3", "version": 3, "path": "/ckpt/code/3", "quality": {"code": 12.5}}
    ray.get(table.set.remote("law", {**law, "version": 1, "path": "/ckpt/law/1"}))
    ray.get(table.set.remote("code", code))
    ray.get(table.set.remote("law", law))
    ray.get(table.set.remote("gone", {"app": f"{app}-gone-v1", "version": 1, "path": "/x"}))
    ray.get(table.remove.remote("gone"))
    ray.get(table.bump_routing.remote())
    epoch, entries = ray.get(table.get.remote())
    assert ray.get(table.poll.remote("router-a", -1, {}))[2] == 1  # routing generation
    assert ray.get(table.poll.remote("router-a", epoch, {})) is None  # a replica on the latest table
    ray.get(table.record_swap.remote("swap-1", {"status": "running"}))
    assert ray.get(table.begin_swap.remote("law"))

    recoveries, pid = [], _pid(table)
    for _ in range(3):
        started = time.monotonic()
        ray.kill(table, no_restart=False)
        seconds, pid = _restarted(table, pid, started)
        recoveries.append(seconds)
        again = ray.get(table.get.remote(), timeout=60)
        assert again == (epoch, entries), f"pointers lost in a restart: {again} != {(epoch, entries)}"

    # A router replica that has the latest table is not sent it again; one that remembers any other epoch
    # (an older one, or a higher one from before a restart) gets the whole table.
    assert ray.get(table.poll.remote("router-a", epoch, {})) is None
    assert ray.get(table.poll.remote("router-b", epoch + 1000, {"x": 1})) == (epoch, entries, 1)
    assert ray.get(table.poll.remote("router-c", 0, {})) == (epoch, entries, 1)
    # Engine replicas still find their application's weights: senmon-law-v1 serves version 2.
    assert ray.get(table.engine_poll.remote("engine-1", f"{app}-law-v1", {"version": 2}))["version"] == 2
    # Transient state is gone, as documented: swap states, the swap guard.
    assert ray.get(table.swap_state.remote("swap-1")) is None
    assert ray.get(table.begin_swap.remote("law"))
    # A drain does not end on the heartbeats a restart lost: it waits until the replicas polled again.
    ray.kill(table, no_restart=False)
    _, pid = _restarted(table, pid, time.monotonic())
    assert not ray.get(table.drained.remote(epoch, f"{app}-law-v1"), timeout=60)["done"]
    ray.get(table.poll.remote("router-a", epoch, {}))
    time.sleep(3.1)
    assert ray.get(table.drained.remote(epoch, f"{app}-law-v1"))["done"]

    # Changes after a restart go on from the same epoch, and survive the next one.
    assert ray.get(table.set.remote("law", {**law, "version": 3})) == epoch + 1
    ray.kill(table, no_restart=False)
    _restarted(table, pid, time.monotonic())
    assert ray.get(table.get.remote(), timeout=60) == (epoch + 1, {**entries, "law": {**law, "version": 3}})

    # A new table actor (after shutdown, or in a new Ray cluster) does not serve the old actor's pointers:
    # the applications they name are gone.
    ray.kill(table, no_restart=True)
    fresh = get_or_create_table(app, storage_root=root)
    assert ray.get(fresh.get.remote()) == (0, {})
    ray.kill(fresh, no_restart=True)

    on_disk = json.loads((tmp_path / "storage" / "serve" / f"{app}-table.json").read_text())
    assert on_disk["entries"]["law"]["version"] == 3
    record_figure("serving_table_restart", {
        "kills": len(recoveries), "recovery_s": [round(s, 3) for s in recoveries],
        "recovery_s_median": round(_median(recoveries), 3), "recovery_s_max": round(max(recoveries), 3),
        "entries": len(entries), "epoch_kept": True})


def test_a_swap_guard_is_taken_over_only_by_its_own_holder():
    """A scheduler killed during a run's swap never releases the guard; restarted, it resumes the swap under
    the same holder (the run id, senmon/system.py). Anyone else still finds the swap running."""
    from senmon.serve.table import ServingTable

    table = ServingTable()
    assert table.begin_swap("law", "run:law-1")
    assert not table.begin_swap("law") and not table.begin_swap("law", "run:law-2")
    assert table.begin_swap("law", "run:law-1")  # the same run, resumed after a restart
    table.end_swap("law")
    assert table.begin_swap("law") and not table.begin_swap("law") and not table.begin_swap("law", "run:law-1")


def test_engines_long_poll_does_not_hold_up_the_tables_other_calls(ray_local, tmp_path):
    """On the real actor, `engine_wait` runs in its own concurrency group: a replica waiting for news does not
    block the calls that make the news, and hears of them at once."""
    from senmon.serve.table import get_or_create_table

    table = get_or_create_table(f"wait-{uuid.uuid4().hex[:8]}", storage_root=str(tmp_path / "storage"))
    ray.get(table.set.remote("law", {"app": "w-law-v1", "version": 1, "path": "/m/1"}))
    # each waits up to 120 s; a table that ran them on its one default thread would answer the `set` only after
    # all three had timed out (360 s), so the bounds below (generous for a loaded host) tell the two apart
    waits = [table.engine_wait.remote(f"r{i}", "w-law-v1", {"version": 1, "refused": {}}, 120) for i in range(3)]
    time.sleep(1.0)  # the three are waiting now
    started = time.monotonic()
    ray.get(table.set.remote("law", {"app": "w-law-v1", "version": 2, "path": "/m/2"}), timeout=60)
    answers = ray.get(waits, timeout=60)
    assert [a["version"] for a in answers] == [2, 2, 2] and time.monotonic() - started < 60
    assert sorted(r["replica"] for r in ray.get(table.engine_reports.remote("w-law-v1"))) == ["r0", "r1", "r2"]
    ray.kill(table, no_restart=True)


# ----------------------------------------------------------------------------- the registry


def _normal(value):
    """A registry result without its timestamps (a replay runs at another time)."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k not in ("created_at", "updated_at", "at")}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _outcome(call):
    from senmon.actors.registry import RegistryError

    try:
        return ("ok", _normal(call()))
    except ray.exceptions.RayTaskError as error:
        cause = error.cause
        return ("error", type(cause).__name__, str(cause))
    except RegistryError as error:
        return ("error", type(error).__name__, str(error))


def _brief(outcome) -> str:
    if outcome[0] == "error" or not isinstance(outcome[1], dict):
        return str(outcome)
    record = outcome[1]
    return (f"v{record['version']} {record['status']} ({record['reason']}), "
            f"{len(record['history'])} changes: {[h['status'] for h in record['history']][-4:]}")


def test_registry_killed_mid_promotion_applies_each_call_once(ray_local, tmp_path):
    """Two callers drive register / promote (passing and rejected) / rollback / refuse while the registry
    is killed 12 times: by `ray.kill` at random moments, and by SIGKILL right after a change reached the
    file and before its answer left (Ray then retries a call that already took effect). Afterwards the
    file never tore or held two serving versions, and every call's answer and the final registry are
    what the same calls give applied once each, in order (RegistryState, no Ray): no call half done,
    none done twice."""
    from senmon.actors.registry import RegistryState, get_or_create_registry

    root = tmp_path / "storage"
    registry = get_or_create_registry(str(root), name=f"registry-{uuid.uuid4().hex[:8]}")
    ray.get(registry.ping.remote())
    registry_file = root / "registry" / "registry.json"
    models = ["law", "code"]
    stop_reading, stop_calling = threading.Event(), threading.Event()
    problems: list[str] = []
    reads = [0]

    def read_file_continuously():
        while not stop_reading.is_set():
            if registry_file.exists():
                try:
                    specialists = json.loads(registry_file.read_text(encoding="utf-8"))["specialists"]
                except ValueError as error:
                    problems.append(f"torn registry file: {error}")
                    continue
                reads[0] += 1
                for model, versions in specialists.items():
                    if sum(v["status"] == "serving" for v in versions) > 1:
                        problems.append(f"{model}: two serving versions in the file")
            time.sleep(0.003)

    calls: dict[str, list] = {m: [] for m in models}  # (method, args, outcome) in the order each caller made them

    def drive(model: str):
        def call(method: str, *args):
            outcome = _outcome(lambda: ray.get(getattr(registry, method).remote(*args), timeout=120))
            calls[model].append((method, args, outcome))
            return outcome[1] if outcome[0] == "ok" else None

        i = 0
        while not stop_calling.is_set():
            good = call("register", model, f"{model}-good-{i}", f"/ckpt/{model}/g{i}", {"val_ppl": 500.0 - i}, {}, {})
            call("promote", model, good["version"], 0.0)  # beats what serves: promoted
            bad = call("register", model, f"{model}-bad-{i}", f"/ckpt/{model}/b{i}", {"val_ppl": 1e6}, {}, {})
            call("promote", model, bad["version"], 0.0)  # the gate rejects it
            call("rollback", model)  # serve the newest retired version before the serving one
            if i % 2 == 1:  # a promoted version refused at swap: the one before it serves again
                before = call("register", model, f"{model}-swap-{i}", f"/ckpt/{model}/s{i}", {"val_ppl": 1.0}, {}, {})
                served = [m[2][1] for m in calls[model] if m[0] == "rollback" and m[2][0] == "ok"]
                call("promote", model, before["version"], 0.0)
                if served:
                    call("refuse", model, before["version"], "probe log-probabilities differ", served[-1]["version"])
            i += 1

    reader = threading.Thread(target=read_file_continuously, daemon=True)
    drivers = [threading.Thread(target=drive, args=(m,), daemon=True) for m in models]
    reader.start()
    for driver in drivers:
        driver.start()
    rng = random.Random(12)
    recoveries: dict[str, list[float]] = {"ray_kill_random_moment": [], "sigkill_after_commit": []}
    pid = _pid(registry)
    time.sleep(0.5)
    for kill in range(12):
        time.sleep(rng.uniform(0.02, 0.3))
        if kill % 3 == 0:
            kind = "ray_kill_random_moment"
            started = time.monotonic()
            ray.kill(registry, no_restart=False)
        else:
            # Right after a change reached the file (a new inode: the rename) and before its caller has the
            # answer: the process is frozen at once and killed, so Ray retries a call that already took effect.
            kind = "sigkill_after_commit"
            inode = registry_file.stat().st_ino
            deadline = time.monotonic() + 5
            while registry_file.stat().st_ino == inode and time.monotonic() < deadline:
                pass
            os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            os.kill(pid, signal.SIGKILL)
        seconds, pid = _restarted(registry, pid, started)  # after the callers' retried calls
        recoveries[kind].append(seconds)
    stop_calling.set()
    for driver in drivers:
        driver.join(timeout=120)
    stop_reading.set()
    reader.join()
    assert not any(d.is_alive() for d in drivers)
    assert not problems, problems[:5]
    assert reads[0] > 0

    # Replay every call, once, on the plain rules: each answer and the final records must match.
    snapshot = ray.get(registry.snapshot.remote())
    on_disk = json.loads(registry_file.read_text(encoding="utf-8"))["specialists"]
    assert on_disk == snapshot
    mismatches = []
    for model in models:
        replay = RegistryState()
        for n, (method, args, outcome) in enumerate(calls[model]):
            expected = _outcome(lambda: getattr(replay, method)(*args))
            if expected != outcome:
                mismatches.append(f"{model} call {n} {method}{args[1:3]}: got {_brief(outcome)}, applied once: "
                                  f"{_brief(expected)}")
        if _normal(snapshot[model]) != _normal(replay.records[model]):
            mismatches.append(f"{model}: the final records differ from the calls applied once each")
        assert sum(r["status"] == "serving" for r in snapshot[model]) == 1
    total = sum(len(c) for c in calls.values())
    every = [t for times in recoveries.values() for t in times]
    record_figure("registry_kill_mid_promotion", {
        "kills": len(every), "calls": total, "mismatches": len(mismatches),
        **{f"recovery_s_{kind}": [round(t, 3) for t in times] for kind, times in recoveries.items()},
        "recovery_s_median": round(_median(every), 3), "recovery_s_max": round(max(every), 3)})
    assert not mismatches, "\n".join(mismatches[:10])
    ray.kill(registry, no_restart=True)


# ----------------------------------------------------------------------------- the scheduler

TINY_TRAINING = {"vocab_size": 256, "seq_len": 32, "batch_size": 4, "epochs": 1, "learning_rate": 0.003,
                 "num_workers": 1, "cpus_per_worker": 1, "use_gpu": False, "promotion_margin": 0.01}


def _tiny_serving_law(config, registry) -> str:
    """Data for law (a seed shard, then a shard of new documents) and a tiny law v1 serving, so that a
    data-triggered retrain takes the real fast path (train/fast.py): one Ray task, seconds of work."""
    from senmon.ingest.split import split_of
    from senmon.ingest.store import DatasetStore
    from senmon.train.loop import new_model
    from senmon.train.sizing import shape_for_hidden
    from senmon.train.tokenizer import save_tokenizer, train_tokenizer

    def rows(split: str, n: int) -> list[dict]:
        lines = (REPO / "data" / "corpus" / split / "law.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        return [{**doc, "text": doc["text"][:300]} for doc in map(json.loads, lines)]

    train, validation = rows("train", 30), rows("validation", 3)
    assert {split_of(d["id"]) for d in train} == {"train"} and {split_of(d["id"]) for d in validation} == {"validation"}
    store = DatasetStore(config.storage_root)
    store.write_shard(train[:20] + validation, name="seed")
    [new_shard] = store.write_shard(train[20:], name="new-documents")
    tokenizer = train_tokenizer([d["text"] for d in train[:20]], 300)
    v1 = f"{config.storage_root}/v1"
    new_model(shape_for_hidden(32, 1), tokenizer, config.training.seq_len).save_pretrained(v1)
    save_tokenizer(tokenizer, v1)
    ray.get(registry.register.remote("law", "law-v1", v1, {"val_ppl": 1e9}, {}, {}))
    assert ray.get(registry.promote.remote("law", 1, 0.0))["status"] == "serving"
    return new_shard


def _wait_for(what: str, check, timeout_s: float = 120.0, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"gave up waiting for {what} after {timeout_s:.0f} s")


def test_scheduler_killed_mid_job_records_each_outcome_once(ray_local, make_config):
    """The scheduler is killed twice during one data-triggered retrain of law (real Ray, the real fast-path
    job): first while the job trains (the job dies with it; the restarted scheduler finds no version
    under the run's id, records the run 'interrupted' and runs the trigger again), then while the
    promoted version's swap hook runs (the version is registered and serving; the restarted scheduler
    takes the run's outcome from the registry and runs the swap hook again). In the end: two runs, one
    new version, each outcome recorded once."""
    from senmon.actors.registry import get_or_create_registry
    from senmon.actors.scheduler import get_or_create_scheduler
    from reliability import swap_hook_calls

    config = make_config(training=TINY_TRAINING, scheduler={"max_retries": 0, "retry_backoff_s": 0.1,
                                                            "check_interval_s": 0.5})
    registry_name = f"registry-{uuid.uuid4().hex[:8]}"
    registry = get_or_create_registry(config.storage_root, name=registry_name)
    new_shard = _tiny_serving_law(config, registry)
    runs_file = Path(config.storage_root) / "scheduler" / "runs.json"

    def runs() -> list[dict]:
        return json.loads(runs_file.read_text(encoding="utf-8"))["runs"] if runs_file.exists() else []

    scheduler = get_or_create_scheduler(config, registry_name, swap_hook="tests.reliability:blocking_swap_hook",
                                        name=f"scheduler-{uuid.uuid4().hex[:8]}")
    assert ray.get(scheduler.data_ready.remote("law", {"new_documents": 10, "shards": [new_shard]})) == "started"

    # 1. Killed while the job runs (a cold job: the worker is still starting and importing torch, or training).
    first = _wait_for("the run recorded as running", lambda: [r for r in runs() if r["outcome"] == "running"])[0]
    time.sleep(1.0)
    assert ray.get(registry.snapshot.remote())["law"][-1]["version"] == 1, "the job finished before the kill"
    killed = time.monotonic()
    ray.kill(scheduler, no_restart=False)
    settled = _wait_for("the interrupted run settled", lambda: [r for r in runs() if r["run_id"] == first["run_id"]
                                                                and r["outcome"] != "running"])[0]
    interrupted_s = time.monotonic() - killed
    assert settled["outcome"] == "interrupted" and "before its job registered" in settled["reason"]
    retry = _wait_for("the retry", lambda: [r for r in runs() if r.get("retry_of") == first["run_id"]])[0]
    retried_s = time.monotonic() - killed
    assert (retry["trigger"], retry["data"]["shards"]) == ("new data", [new_shard])

    # 2. Killed while the promoted version's swap hook runs (registered, gated, serving; not yet recorded).
    _wait_for("the swap hook", lambda: swap_hook_calls(config.storage_root), timeout_s=240)
    assert [r["outcome"] for r in runs() if r["run_id"] == retry["run_id"]] == ["running"]
    killed = time.monotonic()
    ray.kill(scheduler, no_restart=False)
    done = _wait_for("the run settled from the registry", lambda: [
        r for r in runs() if r["run_id"] == retry["run_id"] and r["outcome"] != "running"])[0]
    settled_s = time.monotonic() - killed
    assert ray.get(scheduler.wait_idle.remote(60), timeout=90)

    history = ray.get(scheduler.history.remote("law"))
    assert [(r["run_id"], r["outcome"], r["version"]) for r in history] == [
        (first["run_id"], "interrupted", None), (retry["run_id"], "serving", 2)], history
    assert done["settled"] == "after a scheduler restart, from the registry"
    assert done["swap"] == {"kind": "test hook", "changed": True, "version": 2}
    assert runs() == history  # what the actor says is what the file holds
    versions = ray.get(registry.history.remote("law"))
    assert [(v["version"], v["run_id"], v["status"]) for v in versions] == [
        (1, "law-v1", "retired"), (2, retry["run_id"], "serving")]  # the killed job registered nothing
    hook = swap_hook_calls(config.storage_root)
    assert [(c["version"], c["run_id"]) for c in hook] == [(2, retry["run_id"])] * 2
    assert hook[0]["pid"] != hook[1]["pid"]  # the first call died with the killed scheduler

    record_figure("scheduler_kill_mid_job", {
        "kill_during_training": {"run_settled_s": round(interrupted_s, 3), "retry_started_s": round(retried_s, 3)},
        "kill_during_swap": {"run_settled_s": round(settled_s, 3)},
        "runs": len(history), "versions_registered": len(versions) - 1, "swap_hook_calls": len(hook)})
    ray.kill(scheduler, no_restart=True)
    ray.kill(registry, no_restart=True)
