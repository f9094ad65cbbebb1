"""The model registry: the gate and rollback rules (pure logic), then the real detached Ray actor
killed in the middle of a stream of updates, which must lose and duplicate nothing."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import ray

from senmon.actors.registry import ModelRegistry, RegistryError, RegistryState, get_or_create_registry


def register(state: RegistryState, ppl: float, run_id: str | None = None) -> dict:
    return state.register("law", run_id or uuid.uuid4().hex, f"/ckpt/{ppl}", {"val_ppl": ppl},
                          {"params": 10}, {"shards": {"law": ["seed.parquet"]}})


# ----------------------------------------------------------------------------- rules, no Ray

def test_first_version_is_promoted_and_versions_count_up():
    state = RegistryState()
    first = register(state, 100.0)
    assert (first["version"], first["status"]) == (1, "candidate")
    assert state.current("law") is None
    assert state.promote("law", 1, margin=0.02)["reason"] == "first version"
    assert state.current("law")["version"] == 1
    assert register(state, 90.0)["version"] == 2


def test_register_is_idempotent_by_run_id():
    state = RegistryState()
    a = register(state, 100.0, run_id="run-a")
    again = state.register("law", "run-a", a["path"], {"val_ppl": 55.0}, {}, {})  # a retried call
    assert again["version"] == a["version"] == 1
    assert len(state.history("law")) == 1
    # the same run id for another checkpoint is two runs named alike, not a retry: refused, nothing registered
    with pytest.raises(RegistryError, match="run ids must be unique"):
        register(state, 55.0, run_id="run-a")
    assert len(state.history("law")) == 1


def test_gate_rejects_a_version_that_does_not_beat_the_margin_and_keeps_serving():
    state = RegistryState()
    register(state, 100.0)
    state.promote("law", 1, margin=0.05)
    register(state, 97.0)  # 3% better: not enough for a 5% margin
    second = state.promote("law", 2, margin=0.05)
    assert second["status"] == "rejected"
    assert second["reason"] == "val_ppl 97.00 does not beat serving v1 (100.00) by 5.0%"
    assert state.current("law")["version"] == 1
    with pytest.raises(RegistryError, match="was rejected"):
        state.promote("law", 2, margin=0.05)
    register(state, 90.0)
    third = state.promote("law", 3, margin=0.05)
    assert third["status"] == "serving" and "beats v1" in third["reason"]
    assert state.get("law", 1)["status"] == "retired"


def test_missing_metric_is_rejected_not_promoted():
    state = RegistryState()
    register(state, 100.0)
    state.promote("law", 1, margin=0.0)
    state.register("law", "no-metric", "/ckpt/x", {}, {}, {})
    assert state.promote("law", 2, margin=0.0)["reason"].startswith("val_ppl missing")


def test_force_and_rollback():
    state = RegistryState()
    for ppl in (100.0, 90.0, 95.0):
        register(state, ppl)
    state.promote("law", 1, margin=0.0)
    state.promote("law", 2, margin=0.0)
    assert state.promote("law", 3, margin=0.0)["status"] == "rejected"
    forced = state.promote("law", 3, margin=0.0, force=True)
    assert forced["status"] == "serving" and forced["reason"] == "promoted by force over v2"
    back = state.rollback("law")  # default: the newest retired version before the serving one
    assert back["version"] == 2 and state.get("law", 3)["status"] == "rolled_back"
    assert state.rollback("law", 1)["version"] == 1
    assert [r["status"] for r in state.history("law")] == ["serving", "rolled_back", "rolled_back"]
    # every change is in the version's own history, with its reason
    assert [h["status"] for h in state.get("law", 2)["history"]] == ["candidate", "serving", "retired",
                                                                    "serving", "rolled_back"]


def test_rollback_refusals_name_the_reason():
    state = RegistryState()
    with pytest.raises(RegistryError, match="no serving version"):
        state.rollback("law")
    register(state, 100.0)
    state.promote("law", 1, margin=0.0)
    with pytest.raises(RegistryError, match="no earlier good version"):
        state.rollback("law")
    register(state, 120.0)
    state.promote("law", 2, margin=0.0)  # rejected
    with pytest.raises(RegistryError, match="it is rejected"):
        state.rollback("law", 2)
    with pytest.raises(RegistryError, match="has no version 7"):
        state.rollback("law", 7)
    with pytest.raises(RegistryError, match="no versions of 'code'"):
        state.history("code")


def test_a_version_refused_at_swap_is_rejected_and_the_previous_serves_again():
    state = RegistryState()
    register(state, 100.0)
    state.promote("law", 1, margin=0.02)
    register(state, 50.0)
    assert state.promote("law", 2, margin=0.02)["status"] == "serving"
    serving = state.refuse("law", 2, "probe log-probabilities differ", restore=1)
    assert serving["version"] == 1 and "v2 was refused" in serving["reason"]
    refused = state.get("law", 2)
    assert refused["status"] == "rejected" and refused["reason"] == "refused at swap: probe log-probabilities differ"
    with pytest.raises(RegistryError, match="rejected"):
        state.promote("law", 2, margin=0.02)  # only with force, as any rejected version


def test_a_damaged_registry_file_is_refused_not_replaced(tmp_path):
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "registry.json").write_text('{"format": 1, "speci')
    with pytest.raises(RegistryError, match="not a valid registry file"):
        ModelRegistry(str(tmp_path))
    assert (tmp_path / "registry" / "registry.json").read_text() == '{"format": 1, "speci'


# ----------------------------------------------------------------------------- the real actor

@pytest.mark.slow
def test_actor_survives_being_killed_mid_update_without_losing_or_duplicating(ray_local, tmp_path):
    root = str(tmp_path / "storage")
    name = f"registry-{uuid.uuid4().hex[:8]}"
    registry = get_or_create_registry(root, name=name)
    ray.get(registry.ping.remote())
    registry_file = tmp_path / "storage" / "registry" / "registry.json"
    stop, parsed_while_running = threading.Event(), []

    def check_file_always_parses():
        while not stop.is_set():
            if registry_file.exists():
                json.loads(registry_file.read_text(encoding="utf-8"))  # raises on a torn file
                parsed_while_running.append(1)
            time.sleep(0.005)

    reader = threading.Thread(target=check_file_always_parses, daemon=True)
    reader.start()

    # 1. Registrations in flight while the actor is killed three times (Ray restarts it and retries
    #    the calls, in no particular order): every run is registered once, versions have no gaps.
    n = 120
    run_ids = [f"run-{i:03d}" for i in range(n)]
    registrations = []
    for i, run_id in enumerate(run_ids):
        registrations.append(registry.register.remote("law", run_id, f"/ckpt/{i}", {"val_ppl": 1000.0 - i}, {}, {}))
        if i in (30, 65, 100):
            time.sleep(0.05)
            ray.kill(registry, no_restart=False)
    registered = ray.get(registrations, timeout=180)
    assert sorted(r["version"] for r in registered) == list(range(1, n + 1))
    history = ray.get(registry.history.remote("law"))
    assert sorted(r["run_id"] for r in history) == run_ids  # nothing lost, nothing twice
    assert [r["version"] for r in history] == list(range(1, n + 1))

    # 2. Promotions, each waiting for the one before (as the gate's callers do), while the actor is
    #    killed again three times: each beats the one before, so the last run ends up serving.
    by_run = {r["run_id"]: r["version"] for r in registered}
    promoted: list[dict] = []

    def promote_in_order():
        for run_id in run_ids:
            promoted.append(ray.get(registry.promote.remote("law", by_run[run_id], 0.0), timeout=60))

    promoter = threading.Thread(target=promote_in_order)
    promoter.start()
    for _ in range(3):
        time.sleep(0.15)
        ray.kill(registry, no_restart=False)
    promoter.join(timeout=180)
    stop.set()
    reader.join()

    assert len(promoted) == n and all(r["status"] == "serving" for r in promoted)
    history = ray.get(registry.history.remote("law"))
    assert [r["run_id"] for r in history if r["status"] == "serving"] == [run_ids[-1]]
    assert sum(r["status"] == "retired" for r in history) == n - 1
    assert parsed_while_running

    # What the file holds is what the actor answers, and a fresh actor on the same root sees it too.
    on_disk = json.loads(registry_file.read_text(encoding="utf-8"))["specialists"]["law"]
    assert on_disk == history
    ray.kill(registry, no_restart=True)
    reopened = get_or_create_registry(root, name=f"{name}-reopened")
    assert ray.get(reopened.history.remote("law")) == history
    ray.kill(reopened, no_restart=True)


@pytest.mark.slow
def test_actor_is_named_detached_and_reports_refusals(ray_local, tmp_path):
    name = f"registry-{uuid.uuid4().hex[:8]}"
    registry = get_or_create_registry(str(tmp_path), name=name)
    same = get_or_create_registry(str(tmp_path), name=name)
    assert registry._actor_id == same._actor_id == ray.get_actor(name)._actor_id
    with pytest.raises(RegistryError, match="no serving version"):
        try:
            ray.get(registry.rollback.remote("law"))
        except ray.exceptions.RayTaskError as error:
            raise error.cause from None
    assert not (tmp_path / "registry" / "registry.json").exists()  # a refused change writes nothing
    ray.kill(registry, no_restart=True)
