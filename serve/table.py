"""The serving table: which application answers for each model now, as one small Ray actor.

The router replicas do not ask it per request. Each replica polls it about every 0.2 s
(`poll`), keeps the table in memory, and reports back the table epoch it now uses and how many
requests it has in flight per application. That report is what makes a swap safe: after moving
a pointer, `serve/swap.py` waits until every live router replica runs on the new epoch and none
has a request left on the old application, and only then deletes the old one.

Entries: `{model: {"app", "version", "path", "reference"}}`. After an in-place swap an application
keeps its name and serves another version: engine replicas long-poll `engine_wait` for their
application's entry (answered at once when it names new weights) and load the weights it names
(serve/engine.py). The actor is detached and named (`<app_name>-table`) so the router, the swap code
and the admin endpoints all find it.

**Surviving a crash.** Created with a storage root (`get_or_create_table(app, namespace, storage_root)`),
the table writes its pointers, the epoch and the routing generation to
`{storage_root}/serve/<app_name>-table.json` (temporary file, fsync, rename) before a change returns;
Ray restarts the actor when it dies (`max_restarts=-1`) and retries the calls it had in flight
(`max_task_retries=-1`), and the restarted actor reads the file back. The pointers cannot be
recomputed from the registry: after an in-place swap `senmon-law-v1` may serve version 2. The file
names the actor that wrote it; a new table actor (after `shutdown`, or in a new Ray cluster, where the
applications it pointed at are gone) starts empty as before and overwrites it. Because the
epoch comes back too, a router replica that already has the latest table is not sent it again, and a
swap waiting for the replicas to reach an epoch still can. (`poll` answers a replica whose epoch
differs, higher or lower, with the whole table.) A retried change may be applied twice: each is
idempotent except that the epoch (or the routing generation) goes up once more, which only makes the
replicas fetch the same table again.

What a restart loses, by design: the router replicas' heartbeats and in-flight counts (each replica
polls again within ~0.2 s; a restarted table calls no drain done for `LIVE_S`, so none ends on the
empty heartbeats), the engine replicas'
reports (re-sent at least every `serve.engine_poll_s`), the admin swap states followed by id (`swap_state` no
longer knows an id recorded before) and the guard of the swaps in progress (a swap driver that survives
keeps going, and a second swap of the same model could start meanwhile). Without a storage root the
table lives in memory only and is not restarted, as before.
"""

from __future__ import annotations

import json
import threading
import time

import ray

from senmon.storage import filesystem, read_bytes, write_atomic

LIVE_S = 3.0  # a router replica that has not polled for this long is gone
WAIT_GROUP = "engine-wait"  # the concurrency group of `engine_wait`: each long poll holds a thread of its own
WAIT_THREADS = 64  # long polls at once; more engine replicas than this queue for a thread, up to one wait each


def _own_actor_id() -> str | None:
    try:
        return ray.get_runtime_context().get_actor_id()
    except Exception:  # constructed outside Ray (unit tests)
        return None


class ServingTable:
    def __init__(self, storage_root: str | None = None, app_name: str = "senmon"):
        self.entries: dict[str, dict] = {}
        self.epoch = 0
        self.routers: dict[str, dict] = {}  # replica id -> {"seen", "epoch", "inflight"}
        self.engines: dict[str, dict] = {}  # engine replica id -> {"seen", "app", "version", "refused", ...}
        self.swaps: dict[str, dict] = {}  # admin swap id -> {"status", "result", "error", ...}
        self.swapping: dict[str, str | None] = {}  # model -> who swaps it (see begin_swap)
        self.routing_gen = 0  # bumped to make every router replica reload the routing model
        self.settle_until = 0.0  # a restarted table does not call a drain done before this (see `drained`)
        # Every method runs on the actor's one default thread except `engine_wait`, which runs in WAIT_GROUP's
        # threads: it reads `entries` and `epoch` (replaced, never changed in place) and shares `engines` under
        # this condition's lock, which `_commit` notifies.
        self.changed = threading.Condition()
        self.fs, self.path = None, None
        self.actor_id = _own_actor_id()
        if storage_root:
            self.fs, base = filesystem(storage_root)
            self.path = f"{base}/serve/{table_name(app_name)}.json"
            data = read_bytes(self.fs, self.path)
            if data is not None:
                try:
                    state = json.loads(data)
                    if state["actor_id"] == self.actor_id:  # this actor, restarted: its pointers
                        self.entries, self.epoch = state["entries"], state["epoch"]
                        self.routing_gen = state["routing_gen"]
                        self.settle_until = time.monotonic() + LIVE_S  # until every live router has polled again
                except (ValueError, KeyError) as error:  # never serve pointers from a guess
                    raise ValueError(f"{self.path} is not a valid serving table file: {error}") from None

    def _commit(self, entries: dict[str, dict], routing_gen: int) -> int:
        """Make a change durable (when the table has a file), then current; returns the new epoch."""
        epoch = self.epoch + 1
        if self.path is not None:
            payload = {"format": 1, "actor_id": self.actor_id, "epoch": epoch, "routing_gen": routing_gen,
                       "entries": entries}
            write_atomic(self.fs, self.path, json.dumps(payload, indent=1, ensure_ascii=False).encode("utf-8"))
        with self.changed:
            self.entries, self.epoch, self.routing_gen = entries, epoch, routing_gen
            self.changed.notify_all()
        return epoch

    # ----------------------------------------------------------------- pointers

    def set(self, model: str, entry: dict) -> int:
        return self._commit({**self.entries, model: dict(entry)}, self.routing_gen)

    def set_if_absent(self, model: str, entry: dict) -> int:
        return self.epoch if model in self.entries else self.set(model, entry)

    def bump_routing(self) -> int:
        return self._commit(self.entries, self.routing_gen + 1)

    def remove(self, model: str) -> int:
        return self._commit({m: e for m, e in self.entries.items() if m != model}, self.routing_gen)

    def get(self) -> tuple[int, dict]:
        return self.epoch, dict(self.entries)

    # ----------------------------------------------------------------- router replicas

    def poll(self, replica: str, epoch: int, inflight: dict[str, int]) -> tuple[int, dict, int] | None:
        """A router replica's heartbeat; returns (epoch, entries, routing_gen) when the replica is stale."""
        self.routers[replica] = {"seen": time.monotonic(), "epoch": epoch, "inflight": dict(inflight)}
        return None if epoch == self.epoch else (self.epoch, dict(self.entries), self.routing_gen)

    def leave(self, replica: str) -> None:
        self.routers.pop(replica, None)

    def drained(self, epoch: int, app: str) -> dict:
        """Whether every live router replica uses `epoch` (or later) and has nothing in flight on `app`."""
        now = time.monotonic()
        live = {r: s for r, s in self.routers.items() if now - s["seen"] < LIVE_S}
        behind = [r for r, s in live.items() if s["epoch"] < epoch]
        inflight = sum(s["inflight"].get(app, 0) for s in live.values())
        settled = now >= self.settle_until  # just restarted: the replicas' reports are not all back yet
        return {"done": settled and not behind and inflight == 0, "routers": len(live), "behind": len(behind),
                "inflight": inflight}

    # ----------------------------------------------------------------- engine replicas (serve/engine.py)

    def engine_poll(self, replica: str, app: str, report: dict) -> dict | None:
        """An engine replica's heartbeat with what it serves; returns its application's entry (the
        weights it should serve), or None when no model points at that application."""
        with self.changed:
            self.engines[replica] = {**report, "app": app, "seen": time.monotonic()}
        return _entry_of(self.entries, app)

    @ray.method(concurrency_group=WAIT_GROUP)
    def engine_wait(self, replica: str, app: str, report: dict, timeout_s: float) -> dict | None:
        """`engine_poll` as a long poll: while the entry names the version the replica serves (or one it
        refused), wait up to `timeout_s` for the table to change, then answer with the entry as it is then. So a
        replica hears of new weights at once, and otherwise calls about once per `timeout_s` (its heartbeat)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self.changed:
            self.engines[replica] = {**report, "app": app, "seen": time.monotonic()}
            epoch = self.epoch
            entry = _entry_of(self.entries, app)
            if names_new_weights(entry, report):
                return entry
            self.changed.wait_for(lambda: self.epoch != epoch, timeout=max(0.0, deadline - time.monotonic()))
            self.engines[replica]["seen"] = time.monotonic()
            return _entry_of(self.entries, app)

    def engine_reports(self, app: str) -> list[dict]:
        """What each live replica of `app` reports serving (version, refusals, last swap)."""
        now = time.monotonic()
        with self.changed:
            for replica in [r for r, s in self.engines.items() if now - s["seen"] > 10 * LIVE_S]:
                del self.engines[replica]  # long gone
            return [{**s, "replica": r} for r, s in self.engines.items()
                    if s["app"] == app and now - s["seen"] < LIVE_S]

    # ----------------------------------------------------------------- admin swaps followed by id

    def record_swap(self, swap_id: str, state: dict) -> None:
        self.swaps[swap_id] = dict(state)
        while len(self.swaps) > 200:  # the oldest first
            del self.swaps[next(iter(self.swaps))]

    def swap_state(self, swap_id: str) -> dict | None:
        state = self.swaps.get(swap_id)
        return dict(state) if state is not None else None

    # ----------------------------------------------------------------- one swap per model at a time

    def begin_swap(self, model: str, holder: str | None = None) -> bool:
        """Take `model`'s swap guard. A guard taken with a `holder` is granted again to the same holder: a
        scheduler restarted in the middle of a run's swap resumes it (the dead one never called end_swap)."""
        if model in self.swapping and (holder is None or self.swapping[model] != holder):
            return False
        self.swapping[model] = holder
        return True

    def end_swap(self, model: str) -> None:
        self.swapping.pop(model, None)

    def ping(self) -> bool:
        return True


def _entry_of(entries: dict[str, dict], app: str) -> dict | None:
    """The entry of the model that `app` serves (a copy), or None when no model points at it."""
    for entry in entries.values():
        if entry.get("app") == app:
            return dict(entry)
    return None


def names_new_weights(entry: dict | None, report: dict) -> bool:
    """Whether `entry` asks the replica that sent `report` for weights it has neither loaded nor refused."""
    if entry is None or entry.get("version") is None:
        return False
    return entry["version"] != report.get("version") and str(entry["version"]) not in report.get("refused", {})


def table_name(app_name: str) -> str:
    return f"{app_name}-table"


def get_or_create_table(app_name: str, namespace: str | None = None, storage_root: str | None = None):
    """The named, detached serving table. With `storage_root` its pointers are durable and Ray restarts it
    after a crash, retrying the calls in flight; without, it lives in memory only and is not restarted.
    Whoever creates it decides, so every caller passes the storage root."""
    durable = {"max_restarts": -1, "max_task_retries": -1} if storage_root else {}
    return ray.remote(concurrency_groups={WAIT_GROUP: WAIT_THREADS})(ServingTable).options(
        name=table_name(app_name), namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=1, **durable,
    ).remote(storage_root, app_name)


def get_table(app_name: str, namespace: str | None = None):
    return ray.get_actor(table_name(app_name), namespace=namespace)
