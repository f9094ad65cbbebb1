"""What `senmon status` prints and the router's status page shows, gathered in one place.

`collect_status(config, registry, scheduler, ingest, ...)` reads the running parts (the registry,
scheduler and ingest supervisor actors; any of them may be absent) and the storage root, and
`shape_status` turns what it read into one plain, JSON-able dict:

- `models`: every model (the generalist first, then the specialists, as in the config) with its
  serving version, validation perplexity, freshness (age of the serving version: seconds since it
  was registered, i.e. trained), every version with its status and validation perplexity, the last
  and next training and the documents ingested since its last retrain;
- `routing`: the routing mix of the last hour, when the caller is a router replica (each replica
  counts its own decisions, `RoutingWindow`; `None` from the command line);
- `swaps`: recent swaps with their durations, from the scheduler's run record (every retrain's
  swap, cluster-wide) and, on the router, the admin swaps that replica drove;
- `ingest`: the ingest supervisor's status with the total Kafka lag;
- `router_accuracy`: the routing model's accuracy on the test split;
- `unavailable`: the parts that could not be read, and why.

`senmon status` prints it as its table (`table_rows`), the router serves it as JSON at
`GET /status/data` (serve/status_page.py) and the page at `/status` draws it. `StatusData`
describes the dict for the OpenAPI document; a unit test checks that `shape_status` fits it.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import time
from collections import Counter, deque
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from senmon.metrics import finite_number

ROUTES = ("auto", "named", "fallback")
WINDOW_S = 3600.0  # the routing mix covers the last hour
BUCKET_S = 60.0
MAX_SWAPS = 20
TABLE_HEADERS = ["model", "serving", "val ppl", "last training", "next due", "new docs"]


def iso(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts is not None else None


def parse_iso(text: Any) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None




# --------------------------------------------------------------------------- what a router replica keeps


class RoutingWindow:
    """A router replica's routing decisions of the last `window_s` seconds, counted per model and route
    in one-minute buckets: memory stays bounded (at most window_s / bucket_s + 1 small counters)
    whatever the request rate."""

    def __init__(self, window_s: float = WINDOW_S, bucket_s: float = BUCKET_S, now: float | None = None):
        self.window_s, self.bucket_s = window_s, bucket_s
        self.started = time.time() if now is None else now
        self.buckets: deque[tuple[int, Counter]] = deque()

    def _drop_old(self, now: float) -> None:
        oldest = int((now - self.window_s) // self.bucket_s) + 1
        while self.buckets and self.buckets[0][0] < oldest:
            self.buckets.popleft()

    def add(self, model: str, route: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        index = int(now // self.bucket_s)
        if not self.buckets or self.buckets[-1][0] < index:  # (a clock that stepped back counts in the last one)
            self.buckets.append((index, Counter()))
            self._drop_old(now)
        self.buckets[-1][1][(str(model), route if route in ROUTES else "other")] += 1

    def decided(self, decision: Any, now: float | None = None) -> None:
        """One routing decision of a real request (serve/router.py `Decision`)."""
        self.add(getattr(decision, "specialist", None), getattr(decision, "route", None), now)

    def summary(self, replica: str | None = None, replicas: int | None = None, now: float | None = None) -> dict:
        """The counts of the window; `replica`: this replica's id, `replicas`: how many router replicas there are."""
        now = time.time() if now is None else now
        self._drop_old(now)
        oldest = int((now - self.window_s) // self.bucket_s) + 1
        counts: Counter = Counter()
        for index, bucket in self.buckets:
            if index >= oldest:
                counts.update(bucket)
        by_model: dict[str, dict[str, int]] = {}
        for (model, route), n in sorted(counts.items()):
            row = by_model.setdefault(model, {**{r: 0 for r in ROUTES}, "total": 0})
            row[route] = row.get(route, 0) + n
            row["total"] += n
        since = max(self.started, oldest * self.bucket_s)
        return {"replica": replica, "replicas": replicas, "window_s": self.window_s, "since": iso(since), "total": sum(counts.values()),
                "routes": {r: sum(row.get(r, 0) for row in by_model.values()) for r in ROUTES},
                "by_model": by_model}


class SwapLog:
    """The admin swaps (promote / rollback / reload through `/admin`) a router replica drove, newest last."""

    def __init__(self, size: int = MAX_SWAPS):
        self.entries: deque[dict] = deque(maxlen=size)

    def add(self, action: str, result: Any = None, record: dict | None = None, outcome: str = "done",
            error: str | None = None, now: float | None = None) -> None:
        """`result`: what serve/swap.py's `swap` returned (a list of them for a reload), or None when it failed."""
        at = iso(time.time() if now is None else now)
        for swap in result if isinstance(result, list) else [result]:
            swap = swap if isinstance(swap, dict) else {}
            if outcome == "done" and swap.get("changed") is False:
                continue  # it already served that version: nothing moved
            self.entries.append({
                "at": at, "model": swap.get("model") or (record or {}).get("specialist"),
                "from_version": swap.get("from_version"),
                "version": swap.get("version", (record or {}).get("version")), "kind": swap.get("kind"),
                "seconds": finite_number(swap.get("total_s")), "outcome": outcome, "source": f"admin {action}",
                "error": error})

    def recent(self) -> list[dict]:
        return list(self.entries)


# --------------------------------------------------------------------------- the shape (pure)


def _version_row(record: dict) -> dict:
    metrics = record.get("metrics") or {}
    return {"version": record.get("version"), "status": record.get("status"), "val_ppl": finite_number(metrics.get("val_ppl")),
            "created_at": record.get("created_at"), "reason": record.get("reason")}


def _run_row(run: dict | None) -> dict | None:
    if not run:
        return None
    started, ended = finite_number(run.get("started_ts")), finite_number(run.get("ended_ts"))
    return {"outcome": run.get("outcome"), "trigger": run.get("trigger"), "started_at": run.get("started_at"),
            "ended_at": run.get("ended_at"), "version": run.get("version"), "reason": run.get("reason"),
            "duration_s": ended - started if started is not None and ended is not None else None,
            "swap_s": finite_number(run.get("swap_s"))}


def swaps_from_runs(runs: list[dict]) -> list[dict]:
    """The swaps the scheduler's runs made (or had refused), oldest first."""
    out = []
    for run in runs or []:
        swap = run.get("swap") if isinstance(run.get("swap"), dict) else None
        if swap is not None and swap.get("changed") is not False:
            out.append({"at": run.get("ended_at"), "model": run.get("specialist"), "from_version": swap.get("from_version"),
                        "version": swap.get("version", run.get("version")), "kind": swap.get("kind"),
                        "seconds": finite_number(swap.get("total_s", run.get("swap_s"))), "outcome": "done",
                        "source": f"retrain ({run.get('trigger')})", "error": None})
        elif run.get("outcome") == "swap_refused":
            out.append({"at": run.get("ended_at"), "model": run.get("specialist"), "from_version": None,
                        "version": run.get("version"), "kind": None, "seconds": None, "outcome": "refused",
                        "source": f"retrain ({run.get('trigger')})", "error": run.get("reason")})
    return out


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as None: JSON has neither (Starlette refuses to send them)."""
    if isinstance(value, float):
        return finite_number(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _ingest(raw: dict | None, public: bool) -> dict | None:
    if raw is None:
        return None
    raw = _finite(raw) if public else raw  # (the command line's formatter wants the numbers as they are)
    ingest = {k: v for k, v in raw.items() if k != "listener" and not (public and k in ("storage_root", "group_id"))}
    lags = [finite_number((p or {}).get("lag")) for p in (raw.get("partitions") or {}).values()]
    known = [lag for lag in lags if lag is not None]
    ingest["lag"] = int(sum(known)) if known else None
    return ingest


def shape_status(config, *, records: dict[str, list[dict]] | None, schedule: dict | None = None,
                 runs: list[dict] | None = None, ingest: dict | None = None, router_meta: dict | None = None,
                 routing: dict | None = None, admin_swaps: list[dict] | None = None,
                 unavailable: dict[str, str] | None = None, public: bool = False, now: float | None = None) -> dict:
    """The status as one JSON-able dict, from what `collect_status` read (see the module's docstring)."""
    now = time.time() if now is None else now
    records, schedule = records or {}, schedule or {}
    new_docs = {name: info.get("new_documents") for name, info in ((ingest or {}).get("specialists") or {}).items()}
    models = []
    for name, kind in [(config.generalist.name, "generalist")] + [(s.name, "specialist") for s in config.specialists]:
        versions = sorted((_version_row(r) for r in records.get(name) or []), key=lambda r: r["version"] or 0)
        serving = next((v for v in versions if v["status"] == "serving"), None)
        created = parse_iso(serving["created_at"]) if serving else None
        sched = schedule.get(name) or {}
        models.append({
            "name": name, "kind": kind,
            "domains": list(config.domains) if kind == "generalist" else list(config.specialist(name).domains),
            "serving": serving, "versions": versions,
            "freshness_s": max(now - created, 0.0) if created is not None else None,
            "training": {"running": bool(sched.get("running")), "waiting": bool(sched.get("waiting")),
                         "last": _run_row(sched.get("last_run")), "next_due": sched.get("next_due")},
            "new_documents": new_docs.get(name),
        })
    swaps = swaps_from_runs(runs or []) + list(admin_swaps or [])
    swaps.sort(key=lambda s: s.get("at") or "", reverse=True)
    accuracy = _accuracy(router_meta) if router_meta else None
    return {"generated_at": iso(now), "models": models, "routing": routing, "swaps": swaps[:MAX_SWAPS],
            "ingest": _ingest(ingest, public), "router_accuracy": accuracy, "unavailable": dict(unavailable or {})}


def _accuracy(meta: dict) -> dict:
    """The routing model's test-split accuracy (train/routing.py writes one number per specialist): the mean over
    specialists and each one's, on whole documents and on 100-character snippets."""
    by_model: dict[str, dict[str, float | None]] = {}
    means = {}
    for key, field in (("documents", "test_accuracy_documents"), ("snippets_100", "test_accuracy_snippets_100")):
        value = meta.get(field)
        if isinstance(value, dict):
            for model, accuracy in value.items():
                by_model.setdefault(str(model), {"documents": None, "snippets_100": None})[key] = finite_number(accuracy)
            known = [v for v in (finite_number(a) for a in value.values()) if v is not None]
            means[key] = sum(known) / len(known) if known else None
        else:
            means[key] = finite_number(value)
    return {**means, "by_model": by_model}


def table_rows(status: dict) -> list[list]:
    """`senmon status`'s table (`TABLE_HEADERS`): one row per model."""
    rows = []
    for model in status["models"]:
        serving, last = model["serving"], model["training"]["last"] or {}
        ppl = (serving or {}).get("val_ppl")
        rows.append([model["name"], f"v{serving['version']}" if serving else "-", f"{ppl:.1f}" if ppl else "-",
                     f"{last.get('outcome', '-')} {last.get('ended_at') or ''}".strip(),
                     model["training"]["next_due"] or "-",
                     "-" if model["new_documents"] is None else model["new_documents"]])
    return rows


def accuracy_line(status: dict) -> str | None:
    accuracy = status.get("router_accuracy")
    if not accuracy:
        return None
    return (f"router accuracy on the test split: documents {accuracy['documents'] or 0:.1%}, "
            f"100-character snippets {accuracy['snippets_100'] or 0:.1%}")


# --------------------------------------------------------------------------- reading the parts


def find_actor(name: str, namespace: str | None):
    """A named actor's handle, or None when there is none (the part is not running)."""
    import ray

    if not ray.is_initialized():  # ray.get_actor would start a Ray of its own
        return None
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def _read_json(storage_root: str, relative: str) -> Any:
    from senmon.storage import filesystem, read_bytes

    fs, base = filesystem(storage_root)
    data = read_bytes(fs, f"{base}/{relative}")
    return json.loads(data) if data else None


async def _ask(ref, timeout_s: float):
    return await asyncio.wait_for(ref, timeout_s)


def _why(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "did not answer in time"
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"[:300]


async def collect_status(config, registry=None, scheduler=None, ingest=None, *, routing: dict | None = None,
                         admin_swaps: list[dict] | None = None, public: bool = False, timeout_s: float = 10.0) -> dict:
    """Read every part and shape the status (`shape_status`). `registry`, `scheduler`, `ingest`: the actors'
    handles, or None for a part that is not running (the registry is then read from its file in the storage
    root). `routing` and `admin_swaps`: what the calling router replica keeps (`RoutingWindow.summary`,
    `SwapLog.recent`). `public`: for the HTTP API (leaves the storage root out)."""
    unavailable: dict[str, str] = {}
    records = schedule = runs = raw_ingest = meta = None
    if registry is not None:
        try:
            records = await _ask(registry.snapshot.remote(), timeout_s)
        except Exception as error:
            unavailable["registry"] = f"{_why(error)}; versions from the registry file"
    if records is None:
        try:
            records = ((await asyncio.to_thread(_read_json, config.storage_root, "registry/registry.json"))
                       or {}).get("specialists", {})
        except Exception as error:
            unavailable["registry"] = _why(error)
    if scheduler is None:
        unavailable["scheduler"] = "not running"
    else:
        try:
            schedule = await _ask(scheduler.status.remote(), timeout_s)
            runs = await _ask(scheduler.history.remote(), timeout_s)
        except Exception as error:
            unavailable["scheduler"] = _why(error)
    if ingest is None:
        unavailable["ingest"] = "not running"
    else:
        try:
            raw_ingest = await _ask(ingest.status.remote(), timeout_s)
        except Exception as error:
            unavailable["ingest"] = _why(error)
    try:
        meta = await asyncio.to_thread(_read_json, config.storage_root, "router/router.json")
    except Exception as error:
        unavailable["router_accuracy"] = _why(error)
    return shape_status(config, records=records, schedule=schedule, runs=runs, ingest=raw_ingest, router_meta=meta,
                        routing=routing, admin_swaps=admin_swaps, unavailable=unavailable, public=public)


# --------------------------------------------------------------------------- the shape, for the OpenAPI document


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VersionInfo(_Doc):
    version: int | None
    status: str | None = Field(description="candidate, serving, retired, rejected or rolled_back")
    val_ppl: float | None = Field(description="validation perplexity on the model's own domains")
    created_at: str | None
    reason: str | None


class RunInfo(_Doc):
    outcome: str | None = Field(description="serving (promoted), rejected, swap_refused, failed, interrupted, running")
    trigger: str | None
    started_at: str | None
    ended_at: str | None
    version: int | None
    reason: str | None
    duration_s: float | None
    swap_s: float | None


class TrainingInfo(_Doc):
    running: bool
    waiting: bool
    last: RunInfo | None
    next_due: str | None


class ModelStatus(_Doc):
    name: str
    kind: str = Field(description="generalist or specialist")
    domains: list[str]
    serving: VersionInfo | None
    versions: list[VersionInfo]
    freshness_s: float | None = Field(description="age of the serving version: seconds since it was registered")
    training: TrainingInfo
    new_documents: int | None = Field(description="documents ingested since the model's last retrain")


class RouteCounts(BaseModel):
    auto: int = 0
    named: int = 0
    fallback: int = 0
    total: int = 0


class RoutingMix(_Doc):
    replica: str | None = Field(description="the router replica that counted (each replica counts its own)")
    replicas: int | None = Field(description="router replicas configured (serve.router_replicas)")
    window_s: float
    since: str | None
    total: int
    routes: dict[str, int]
    by_model: dict[str, RouteCounts]


class SwapInfo(_Doc):
    at: str | None
    model: str | None
    from_version: int | None
    version: int | None
    kind: str | None = Field(description="in_place or blue_green")
    seconds: float | None
    outcome: str
    source: str
    error: str | None


class RouterAccuracy(_Doc):
    documents: float | None = Field(description="mean over the specialists, whole test documents")
    snippets_100: float | None = Field(description="mean over the specialists, one 100-character snippet per document")
    by_model: dict[str, dict[str, float | None]] = Field(description="each specialist's: documents, snippets_100")


class StatusData(_Doc):
    """`GET /status/data`: what `senmon status` prints, as JSON (senmon/status.py)."""

    generated_at: str
    models: list[ModelStatus]
    routing: RoutingMix | None = Field(description="the last hour's routing decisions of the answering router replica")
    swaps: list[SwapInfo] = Field(description="recent swaps, newest first")
    ingest: dict[str, Any] | None = Field(description="the ingest supervisor's status; `lag`: Kafka messages not read yet")
    router_accuracy: RouterAccuracy | None
    unavailable: dict[str, str] = Field(description="parts that could not be read, and why")
