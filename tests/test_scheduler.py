"""The retraining scheduler: schedule arithmetic (pure), then the real actor with real (failing) jobs.

A job that succeeds end to end (Kafka -> dataset -> retrain -> gate -> swap) is covered by the
end-to-end test; here the jobs fail fast on purpose (an empty storage root) so retries, one job
per specialist, and the durable run record can be checked in seconds.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pytest
import ray

from senmon.actors.scheduler import get_or_create_scheduler, next_due
from senmon.config import ConfigError, ScheduleConfig


def test_interval_and_cron_schedules():
    base = datetime(2026, 11, 23, 10, 17, tzinfo=timezone.utc).timestamp()
    assert next_due(ScheduleConfig(interval="30m"), base) == base + 1800
    at_three = next_due(ScheduleConfig(cron="0 3 * * *"), base)
    assert datetime.fromtimestamp(at_three, timezone.utc) == datetime(2026, 11, 24, 3, 0, tzinfo=timezone.utc)
    both = ScheduleConfig(interval="1d", cron="30 10 * * *")  # whichever comes first
    assert datetime.fromtimestamp(next_due(both, base), timezone.utc).minute == 30
    assert next_due(ScheduleConfig(), base) is None


def test_a_bad_cron_expression_is_a_config_error(make_config, embedded_config_data):
    specialists = [dict(s) for s in embedded_config_data["specialists"]]
    specialists[0]["schedule"] = {"cron": "61 * * * *"}
    with pytest.raises(ConfigError, match=r"specialists\.0\.schedule\.cron"):
        make_config(specialists=specialists)


@pytest.mark.slow
def test_failed_jobs_are_retried_recorded_and_never_run_twice_at_once(ray_local, make_config, tmp_path):
    from senmon.actors.registry import get_or_create_registry

    config = make_config(scheduler={"max_retries": 2, "retry_backoff_s": 0.1, "check_interval_s": 0.2})
    registry_name = f"registry-{uuid.uuid4().hex[:8]}"
    registry = get_or_create_registry(config.storage_root, name=registry_name)
    name = f"scheduler-{uuid.uuid4().hex[:8]}"
    scheduler = get_or_create_scheduler(config, registry_name, name=name)

    # Nothing was trained or loaded into this storage root: every attempt fails, law having no seed to branch from.
    assert ray.get(scheduler.trigger.remote("law", "manual")) == "started"
    assert ray.get(scheduler.trigger.remote("law", "new data", {"new_documents": 250})) == "queued behind the running job"
    with pytest.raises(ValueError, match="no specialist named 'nope'"):
        try:
            ray.get(scheduler.trigger.remote("nope"))
        except ray.exceptions.RayTaskError as error:
            raise error.cause from None
    assert ray.get(scheduler.wait_idle.remote(120))

    runs = ray.get(scheduler.history.remote("law"))
    assert [(r["trigger"], r["attempt"], r["outcome"]) for r in runs] == [
        ("manual", 1, "failed"), ("manual", 2, "failed"), ("manual", 3, "failed"),
        ("new data", 1, "failed"), ("new data", 2, "failed"), ("new data", 3, "failed")]
    assert all("branches from the seed, generalist, which has no serving version" in r["reason"] for r in runs), \
        runs[0]["reason"]
    assert runs[3]["data"] == {"new_documents": 250}
    for earlier, later in zip(runs, runs[1:]):  # one job per specialist at a time
        assert earlier["ended_at"] <= later["started_at"]
    assert ray.get(registry.specialists.remote()) == []  # nothing was registered, nothing changed serving

    on_disk = json.loads((tmp_path / "storage" / "scheduler" / "runs.json").read_text())["runs"]
    assert [r["run_id"] for r in on_disk] == [r["run_id"] for r in runs]
    status = ray.get(scheduler.status.remote())
    assert status["law"]["last_run"]["outcome"] == "failed" and not status["law"]["running"]
    assert status["law"]["next_due"] is not None  # law has a 6h interval in the embedded config

    # A restarted scheduler reads its record back.
    ray.kill(scheduler, no_restart=False)
    assert len(ray.get(scheduler.history.remote("law"), timeout=60)) == 6
    ray.kill(scheduler, no_restart=True)
    ray.kill(registry, no_restart=True)
