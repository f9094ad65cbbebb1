"""The serving table: which application answers for each model now, as one small Ray actor.

The router replicas do not ask it per request. Each replica polls it about every 0.2 s
(`poll`), keeps the table in memory, and reports back the table epoch it now uses and how many
requests it has in flight per application. That report is what makes a swap safe: after moving
a pointer, `serve/swap.py` waits until every live router replica runs on the new epoch and none
has a request left on the old application, and only then deletes the old one.

Entries: `{model: {"app", "version", "path", "reference"}}`. After an in-place swap an application
keeps its name and serves another version: engine replicas poll `engine_poll` for their
application's entry and load the weights it names (serve/engine.py). The actor is detached and named
(`<app_name>-table`) so the router, the swap code and the admin endpoints all find it.
"""

from __future__ import annotations

import time

import ray

LIVE_S = 3.0  # a router replica that has not polled for this long is gone


class ServingTable:
    def __init__(self):
        self.entries: dict[str, dict] = {}
        self.epoch = 0
        self.routers: dict[str, dict] = {}  # replica id -> {"seen", "epoch", "inflight"}
        self.engines: dict[str, dict] = {}  # engine replica id -> {"seen", "app", "version", "refused", ...}
        self.swaps: dict[str, dict] = {}  # admin swap id -> {"status", "result", "error", ...}
        self.swapping: set[str] = set()
        self.routing_gen = 0  # bumped to make every router replica reload the routing model

    # ----------------------------------------------------------------- pointers

    def set(self, model: str, entry: dict) -> int:
        self.entries[model] = dict(entry)
        self.epoch += 1
        return self.epoch

    def set_if_absent(self, model: str, entry: dict) -> int:
        return self.epoch if model in self.entries else self.set(model, entry)

    def bump_routing(self) -> int:
        self.routing_gen += 1
        self.epoch += 1
        return self.epoch

    def remove(self, model: str) -> int:
        self.entries.pop(model, None)
        self.epoch += 1
        return self.epoch

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
        return {"done": not behind and inflight == 0, "routers": len(live), "behind": len(behind), "inflight": inflight}

    # ----------------------------------------------------------------- engine replicas (serve/engine.py)

    def engine_poll(self, replica: str, app: str, report: dict) -> dict | None:
        """An engine replica's heartbeat with what it serves; returns its application's entry (the
        weights it should serve), or None when no model points at that application."""
        self.engines[replica] = {**report, "app": app, "seen": time.monotonic()}
        for entry in self.entries.values():
            if entry.get("app") == app:
                return dict(entry)
        return None

    def engine_reports(self, app: str) -> list[dict]:
        """What each live replica of `app` reports serving (version, refusals, last swap)."""
        now = time.monotonic()
        for replica in [r for r, s in self.engines.items() if now - s["seen"] > 10 * LIVE_S]:
            del self.engines[replica]  # long gone
        return [{**s, "replica": r} for r, s in self.engines.items() if s["app"] == app and now - s["seen"] < LIVE_S]

    # ----------------------------------------------------------------- admin swaps followed by id

    def record_swap(self, swap_id: str, state: dict) -> None:
        self.swaps[swap_id] = dict(state)
        while len(self.swaps) > 200:  # the oldest first
            del self.swaps[next(iter(self.swaps))]

    def swap_state(self, swap_id: str) -> dict | None:
        state = self.swaps.get(swap_id)
        return dict(state) if state is not None else None

    # ----------------------------------------------------------------- one swap per model at a time

    def begin_swap(self, model: str) -> bool:
        if model in self.swapping:
            return False
        self.swapping.add(model)
        return True

    def end_swap(self, model: str) -> None:
        self.swapping.discard(model)

    def ping(self) -> bool:
        return True


def table_name(app_name: str) -> str:
    return f"{app_name}-table"


def get_or_create_table(app_name: str, namespace: str | None = None):
    return ray.remote(ServingTable).options(
        name=table_name(app_name), namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=1,
    ).remote()


def get_table(app_name: str, namespace: str | None = None):
    return ray.get_actor(table_name(app_name), namespace=namespace)
