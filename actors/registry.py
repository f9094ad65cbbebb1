"""The model registry: every specialist's versions, which one serves, and why.

`RegistryState` holds the records and the rules (plain Python, tested without Ray): versions are
numbered per specialist; a version is promoted only through the gate (its validation perplexity
must beat the serving version's by a margin), otherwise it is kept as rejected with the reason;
rollback serves an earlier good version again. Exactly one version per specialist serves.

`ModelRegistry` is the named, detached Ray actor around it. Each change is applied to a copy,
written whole to `{storage_root}/registry/registry.json` (temporary file, fsync, rename) and only
then made current, so killing the actor at any moment leaves the old file or the new one. On
(re)start the actor reads the file back. Calls are retried on a restarted actor. A retried call
whose change had reached the file before the crash (only its answer was lost) is not applied
again: the file also keeps the answers of the latest changes by Ray task id, which a retry keeps,
and the retry gets that answer. Without it a retried rollback would roll back one version further
(or fail: "no earlier good version"), and a retried promotion the gate rejected would fail ("was
rejected"). `register` is also idempotent by `run_id`, so a job that registers twice never creates
a second version.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import ray

from senmon.metrics import record_promotion, record_rollback, record_serving
from senmon.storage import filesystem, read_bytes, write_atomic

STATUSES = ("candidate", "serving", "retired", "rejected", "rolled_back")
REGISTRY_ACTOR = "senmon-registry"
ANSWERS_KEPT = 32  # answers of the latest changes kept in the file, for calls Ray retries after a crash


class RegistryError(ValueError):
    """A request the registry refuses (unknown specialist or version, a rejected version, ...)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RegistryState:
    """Records `{specialist: [record, ...]}` and the promotion / rollback rules."""

    def __init__(self, records: dict[str, list[dict]] | None = None):
        self.records: dict[str, list[dict]] = records or {}

    # ----------------------------------------------------------------- reading

    def specialists(self) -> list[str]:
        return sorted(self.records)

    def history(self, specialist: str) -> list[dict]:
        if specialist not in self.records:
            raise RegistryError(f"no versions of {specialist!r} in the registry")
        return copy.deepcopy(self.records[specialist])

    def get(self, specialist: str, version: int) -> dict:
        for record in self.records.get(specialist, []):
            if record["version"] == version:
                return record
        raise RegistryError(f"{specialist} has no version {version}")

    def current(self, specialist: str) -> dict | None:
        serving = [r for r in self.records.get(specialist, []) if r["status"] == "serving"]
        return copy.deepcopy(serving[0]) if serving else None

    def snapshot(self) -> dict:
        return copy.deepcopy(self.records)

    # ----------------------------------------------------------------- changing

    def _set(self, record: dict, status: str, reason: str) -> None:
        record["status"], record["reason"], record["updated_at"] = status, reason, _now()
        record["history"].append({"at": record["updated_at"], "status": status, "reason": reason})

    def register(self, specialist: str, run_id: str, path: str, metrics: dict, sizing: dict, data: dict) -> dict:
        versions = self.records.setdefault(specialist, [])
        for record in versions:
            if record["run_id"] == run_id:  # a retried call: the version already exists
                if record["path"] != path:  # not a retry: two runs named alike
                    raise RegistryError(f"{specialist} run {run_id} is v{record['version']} with the checkpoint "
                                        f"{record['path']}, not {path}: run ids must be unique")
                return copy.deepcopy(record)
        record = {"specialist": specialist, "version": max((r["version"] for r in versions), default=0) + 1,
                  "run_id": run_id, "path": path, "metrics": metrics, "sizing": sizing, "data": data,
                  "created_at": _now(), "history": []}
        self._set(record, "candidate", "registered")
        versions.append(record)
        return copy.deepcopy(record)

    def promote(self, specialist: str, version: int, margin: float, metric: str = "val_ppl", force: bool = False,
                reason: str | None = None, against: int | None = None) -> dict:
        """The gate: lower `metric` is better; a candidate must beat the serving one by `margin` (relative).
        `force` skips it; `reason` then says why (default: promoted by force). `against`: the version the candidate
        must beat instead of the serving one (a retrained seed is held to the seed, not to a merge that serves)."""
        record = self.get(specialist, version)
        serving = next((r for r in self.records[specialist] if r["status"] == "serving"), None)
        if serving is record:
            return copy.deepcopy(record)
        if record["status"] == "rejected" and not force:
            raise RegistryError(f"{specialist} v{version} was rejected ({record['reason']}); promote it with force")
        value = record["metrics"].get(metric)
        baseline = self.get(specialist, against) if against is not None else serving
        if force:
            reason = (reason + "; " if reason else "") + \
                f"promoted by force over {'v%d' % serving['version'] if serving else 'nothing'}"
        elif baseline is None:
            reason = "first version"
        else:
            best = baseline["metrics"].get(metric)
            held_to = f"v{baseline['version']} ({best:.2f})" if baseline is serving else \
                f"v{baseline['version']} ({best:.2f}, the version it is held to)"
            if value is None or best is None or not value < best * (1 - margin):
                shown = "missing" if value is None else f"{value:.2f}"
                self._set(record, "rejected", f"{metric} {shown} does not beat {'serving ' if baseline is serving else ''}"
                                              f"{held_to} by {margin:.1%}")
                return copy.deepcopy(record)
            reason = f"{metric} {value:.2f} beats {held_to} by more than {margin:.1%}"
        if serving is not None:
            self._set(serving, "retired", f"replaced by v{version}")
        self._set(record, "serving", reason)
        return copy.deepcopy(record)

    def rollback(self, specialist: str, version: int | None = None) -> dict:
        """Serve `version` again (default: the newest retired one older than the serving one)."""
        serving = next((r for r in self.records.get(specialist, []) if r["status"] == "serving"), None)
        if serving is None:
            raise RegistryError(f"{specialist} has no serving version to roll back from")
        if version is None:
            earlier = [r for r in self.records[specialist] if r["status"] == "retired" and r["version"] < serving["version"]]
            if not earlier:
                raise RegistryError(f"{specialist} has no earlier good version to roll back to")
            target = max(earlier, key=lambda r: r["version"])
        else:
            target = self.get(specialist, version)
        if target is serving:
            return copy.deepcopy(target)
        if target["status"] not in ("retired", "rolled_back"):
            raise RegistryError(f"cannot roll {specialist} back to v{target['version']}: it is {target['status']}")
        self._set(serving, "rolled_back", f"rolled back to v{target['version']}")
        self._set(target, "serving", f"rollback from v{serving['version']}")
        return copy.deepcopy(target)


    def refuse(self, specialist: str, version: int, reason: str, restore: int | None = None) -> dict | None:
        """`version` could not be served (its swap was refused): mark it rejected with the reason and
        serve `restore` (the version that served before it) again; returns the serving record."""
        record = self.get(specialist, version)
        self._set(record, "rejected", f"refused at swap: {reason}")
        if restore is not None and restore != version:
            target = self.get(specialist, restore)
            self._set(target, "serving", f"restored: v{version} was refused at swap")
        return self.current(specialist)


def _calling_task() -> str | None:
    """The Ray task id of the actor call being run (the same on each retry of it), None outside an actor."""
    try:
        context = ray.get_runtime_context()
        return context.get_task_id() if context.get_actor_id() is not None else None
    except Exception:
        return None


class ModelRegistry:
    """The registry as a Ray actor whose every change is durable before it returns."""

    def __init__(self, storage_root: str):
        self.fs, base = filesystem(storage_root)
        self.path = f"{base}/registry/registry.json"
        data = read_bytes(self.fs, self.path)
        self.answers: dict[str, Any] = {}  # Ray task id of a change -> its answer (the latest ANSWERS_KEPT)
        if data is None:
            self.state = RegistryState()
        else:
            try:
                payload = json.loads(data)
                self.state = RegistryState(payload["specialists"])
                self.answers = dict(payload.get("answers", []))
            except (ValueError, KeyError, TypeError) as error:  # never start empty over a damaged file
                raise RegistryError(f"{self.path} is not a valid registry file: {error}") from None
        record_serving(self.state.records)

    def _apply(self, change: str, *args, **kwargs) -> dict:
        task = _calling_task()
        if task is not None and task in self.answers:  # a retry of a change made before a crash: not again
            return copy.deepcopy(self.answers[task])
        trial = RegistryState(copy.deepcopy(self.state.records))
        result = getattr(trial, change)(*args, **kwargs)
        answers = dict(self.answers)
        if task is not None:
            answers[task] = result
            answers = dict(list(answers.items())[-ANSWERS_KEPT:])
        payload = {"format": 1, "written_at": _now(), "specialists": trial.records,
                   "answers": [[t, a] for t, a in answers.items()]}
        write_atomic(self.fs, self.path, json.dumps(payload, indent=1, ensure_ascii=False).encode("utf-8"))
        self.state, self.answers = trial, answers
        record_serving(self.state.records)
        return copy.deepcopy(result)

    def register(self, specialist: str, run_id: str, path: str, metrics: dict, sizing: dict, data: dict) -> dict:
        return self._apply("register", specialist, run_id, path, metrics, sizing, data)

    def promote(self, specialist: str, version: int, margin: float, metric: str = "val_ppl", force: bool = False,
                reason: str | None = None, against: int | None = None) -> dict:
        record = self._apply("promote", specialist, version, margin, metric=metric, force=force, reason=reason,
                             against=against)
        record_promotion(specialist, record["status"])
        return record

    def rollback(self, specialist: str, version: int | None = None) -> dict:
        record = self._apply("rollback", specialist, version)
        record_rollback(specialist)
        return record

    def refuse(self, specialist: str, version: int, reason: str, restore: int | None = None) -> dict | None:
        return self._apply("refuse", specialist, version, reason, restore)

    def current(self, specialist: str) -> dict | None:
        return self.state.current(specialist)

    def history(self, specialist: str) -> list[dict]:
        return self.state.history(specialist)

    def get(self, specialist: str, version: int) -> dict:
        return copy.deepcopy(self.state.get(specialist, version))

    def specialists(self) -> list[str]:
        return self.state.specialists()

    def snapshot(self) -> dict[str, Any]:
        return self.state.snapshot()

    def ping(self) -> bool:
        return True


def serving_records_from_file(storage_root: str, models: list[str]) -> dict[str, dict]:
    """The serving record of each of `models` read from the registry's durable file (no Ray needed)."""
    fs, base = filesystem(storage_root)
    data = read_bytes(fs, f"{base}/registry/registry.json")
    state = RegistryState(json.loads(data)["specialists"] if data else {})
    return {m: r for m in models if (r := state.current(m)) is not None}


def get_or_create_registry(storage_root: str, name: str = REGISTRY_ACTOR, namespace: str | None = None):
    """The named, detached registry actor: restarted by Ray after a crash, calls retried on it."""
    return ray.remote(ModelRegistry).options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True, max_restarts=-1,
        max_task_retries=-1, num_cpus=0, max_concurrency=1,
    ).remote(storage_root)


def get_registry(name: str = REGISTRY_ACTOR, namespace: str | None = None):
    return ray.get_actor(name, namespace=namespace)
