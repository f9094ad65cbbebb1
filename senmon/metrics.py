"""senmon's Prometheus metrics, through Ray's own metrics system (`ray.util.metrics`).

Each process that records (a router replica, the registry and scheduler actors, a swap task, an
ingest actor) sends its series to its node's Ray metrics agent, which serves them with Ray's,
Ray Serve's and vLLM's on the node's metrics export port. Ray prefixes every name with `ray_`, a
counter gets `_total`, a histogram `_bucket` / `_sum` / `_count`: `senmon_requests` is scraped as
`ray_senmon_requests_total` (`exported_names` says which names Prometheus sees). The Grafana
dashboard in docs/grafana/senmon.json is built from exactly these names.

The metric objects are created on first use (`metrics()`, cached per process), so importing this
module never needs Ray, and every `record_*` helper swallows its own errors (logged at debug):
a metric must never break a request, a swap or a training run. Tag values are short strings
from small fixed sets (route kinds, outcomes, reasons, model names) so series stay few.

The ingest bridge's series (messages, bytes, documents per specialist, duplicates, dead letters
by reason, offsets, new documents) are defined by ingest/metrics.py; `INGEST_SPECS` names them
here so the docs and the dashboard test see every senmon metric in one place.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

log = logging.getLogger("senmon.metrics")

PREFIX = "senmon_"
EXPORT_PREFIX = "ray_"  # what Ray's Prometheus exporter puts in front of every custom metric
# How often the registry's process sets its per-model gauges again (freshness counts up; version and perplexity are
# repeated). Ray's exporter drops a gauge series that no report has carried for two report intervals (2 x 10 s by
# default), and a process reports a gauge only when it was set: one set at a promotion and never again leaves the
# scrape within about 30 s.
FRESHNESS_TICK_S = 5.0

ROUTES = ("auto", "named", "fallback")
FALLBACK_REASONS = ("no_domain", "low_confidence", "likelihood", "no_serving_version", "worse_than_fallback",
                    "no_routing")
SWAP_KINDS = ("in_place", "blue_green")
SWAP_OUTCOMES = ("done", "refused", "failed")
TRIGGERS = ("schedule", "new_data", "manual")
RUN_OUTCOMES = ("promoted", "rejected", "swap_refused", "failed")


@dataclass(frozen=True)
class Spec:
    attr: str  # the attribute on `metrics()`
    name: str
    kind: str  # "counter", "gauge" or "histogram"
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


SPECS: tuple[Spec, ...] = (
    # the router
    Spec("requests", "senmon_requests", "counter",
         "Generation requests, by the model that answered, the route (auto / named / fallback) and the "
         "status class (2xx / 4xx / 5xx); 'none' where the request failed before routing.",
         ("model", "route", "status")),
    Spec("errors", "senmon_errors", "counter", "Error responses of the router's HTTP API, by status and code.",
         ("status", "code")),
    Spec("routing_confidence", "senmon_routing_confidence", "histogram",
         "The routing model's best score for 'auto' requests, by its first choice.",
         ("model",), (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)),
    Spec("routing_latency_ms", "senmon_routing_latency_ms", "histogram",
         "Time the routing model took to decide an 'auto' request, in milliseconds.",
         ("route",), (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0)),
    Spec("fallbacks", "senmon_fallbacks", "counter",
         "'auto' requests sent to the generalist, by reason (no_domain / low_confidence / likelihood / "
         "no_serving_version / worse_than_fallback / no_routing) and the routing model's first choice.",
         ("reason", "model")),
    # swaps
    Spec("swaps", "senmon_swaps", "counter",
         "Swaps to a new serving version, by model, kind (in_place / blue_green) and outcome (done / refused / failed).",
         ("model", "kind", "outcome")),
    Spec("swap_duration_seconds", "senmon_swap_duration_seconds", "histogram",
         "Duration of a swap, from its start to done (or to its failure), in seconds.",
         ("model", "kind", "outcome"), (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)),
    # training and the registry
    Spec("training_runs", "senmon_training_runs", "counter",
         "Retraining runs, by model, trigger (schedule / new_data / manual) and outcome "
         "(promoted / rejected / swap_refused / failed).",
         ("model", "trigger", "outcome")),
    Spec("training_duration_seconds", "senmon_training_duration_seconds", "histogram",
         "Duration of a retraining run (train, register, gate, swap), in seconds.",
         ("model", "trigger", "outcome"), (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                                            7200.0, 14400.0)),
    Spec("promotions", "senmon_promotions", "counter",
         "Promotion requests at the registry's gate, by model and outcome (promoted / rejected).",
         ("model", "outcome")),
    Spec("rollbacks", "senmon_rollbacks", "counter", "Rollbacks to an earlier version, by model.", ("model",)),
    Spec("serving_version", "senmon_serving_version", "gauge", "The version each model serves.", ("model",)),
    Spec("serving_val_ppl", "senmon_serving_val_ppl", "gauge",
         "Validation perplexity of each model's serving version.", ("model",)),
    Spec("freshness_seconds", "senmon_freshness_seconds", "gauge",
         "Age of each model's serving version: seconds since it was registered (trained).", ("model",)),
    # ingest (the rest of ingest's series are in ingest/metrics.py, see INGEST_SPECS)
    Spec("ingest_lag", "senmon_ingest_lag", "gauge",
         "Kafka messages not yet read, per partition (high-water mark minus the consumer's position).",
         ("topic", "partition")),
    Spec("ingest_domain_documents", "senmon_ingest_domain_documents", "counter",
         "New documents written to the dataset, per domain.", ("domain",)),
)

# Defined and recorded by ingest/metrics.py (WorkerMetrics, SupervisorMetrics); tests check the two agree.
INGEST_SPECS: tuple[Spec, ...] = (
    Spec("", "senmon_ingest_messages", "counter", "Kafka messages taken into the dataset or dead-lettered.",
         ("topic", "partition")),
    Spec("", "senmon_ingest_bytes", "counter", "Bytes of Kafka message values ingested.", ("topic", "partition")),
    Spec("", "senmon_ingest_documents", "counter", "New documents written to the dataset, per specialist.",
         ("specialist",)),
    Spec("", "senmon_ingest_duplicates", "counter", "Documents skipped because their id is already stored.",
         ("specialist",)),
    Spec("", "senmon_ingest_dead_letters", "counter", "Messages sent to the dead-letter topic, per reason.",
         ("reason",)),
    Spec("", "senmon_ingest_position", "gauge", "Next offset the consumer reads, per partition.",
         ("topic", "partition")),
    Spec("", "senmon_ingest_committed_offset", "gauge", "Committed offset (next to read after a restart).",
         ("topic", "partition")),
    Spec("", "senmon_ingest_new_documents", "gauge", "Documents ingested since the specialist's last retrain reset.",
         ("specialist",)),
    Spec("", "senmon_ingest_actor_restarts", "counter", "Ingest actors replaced by the supervisor."),
)


def exported_names(spec: Spec) -> tuple[str, ...]:
    """The series names Prometheus scrapes for `spec` from Ray's metrics export port."""
    base = EXPORT_PREFIX + spec.name
    if spec.kind == "counter":
        return (base + "_total",)
    if spec.kind == "histogram":
        return (base + "_bucket", base + "_sum", base + "_count")
    return (base,)


def all_exported_names() -> set[str]:
    return {name for spec in SPECS + INGEST_SPECS for name in exported_names(spec)}


_metrics: SimpleNamespace | None = None
_lock = threading.Lock()


def metrics() -> SimpleNamespace:
    """This process's metric objects, created on the first call (one per `SPECS` entry, by `attr`)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                from ray.util.metrics import Counter, Gauge, Histogram

                made = {}
                for spec in SPECS:
                    if spec.kind == "counter":
                        made[spec.attr] = Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
                    elif spec.kind == "gauge":
                        made[spec.attr] = Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
                    else:
                        made[spec.attr] = Histogram(spec.name, spec.description, boundaries=list(spec.boundaries),
                                                    tag_keys=spec.tag_keys)
                _metrics = SimpleNamespace(**made)
    return _metrics


def _tag(value: Any, allowed: tuple[str, ...] | None = None, default: str = "other") -> str:
    """A tag value: a short string; outside `allowed` (when given) it becomes `default`."""
    text = "none" if value is None or value == "" else str(value)[:64]
    if allowed is not None and text not in allowed:
        return default
    return text


def finite_number(value: Any) -> float | None:
    """`value` as a float, or None when it is not a finite number (also senmon/status.py's)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None  # no NaN, no infinity


def status_class(status: Any) -> str:
    """200 -> "2xx", 503 -> "5xx"; anything else -> "other"."""
    try:
        code = int(status)
    except (TypeError, ValueError):
        return "other"
    return f"{code // 100}xx" if 100 <= code < 600 else "other"


def fallback_kind(reason: str) -> str:
    """The kind of a fallback from the router's `Decision.reason` (serve/router.py, `decide`)."""
    reason = reason or ""
    if "no specialist's domain" in reason:  # the routing model's `none` class
        return "no_domain"
    if "does not beat" in reason:
        return "worse_than_fallback"
    if "under the margin" in reason:  # the likelihood second opinion: no specialist explains the prompt better
        return "likelihood"
    if "has no serving version" in reason:
        return "no_serving_version"
    if "below" in reason:
        return "low_confidence"
    if "no routing model" in reason:
        return "no_routing"
    return "other"


def trigger_kind(trigger: str) -> str:
    """The scheduler's trigger text ("schedule", "new data", "manual", ...) as a tag value."""
    text = str(trigger or "").strip().lower().replace(" ", "_")
    return text if text in TRIGGERS else "other"


def run_outcome(outcome: str) -> str:
    """A scheduler run's outcome (the registry's status, or "swap_refused" / "failed") as a tag value."""
    text = {"serving": "promoted"}.get(str(outcome), str(outcome))
    return text if text in RUN_OUTCOMES else "other"


def _safely(what: str, record, *args) -> None:
    try:
        record(*args)
    except Exception as error:  # a metric must never break the work it measures
        log.debug("metric %s not recorded: %s", what, error, exc_info=True)


# --------------------------------------------------------------------------- the router


def record_request(model: Any, route: Any, status: Any) -> None:
    """One generation request answered (or refused) with HTTP `status`."""
    def do():
        metrics().requests.inc(1, {"model": _tag(model), "route": _tag(route, ROUTES + ("none",)),
                                   "status": status_class(status)})
    _safely("requests", do)


def record_error(status: Any, code: Any = None) -> None:
    """One error response (every error body the router's HTTP API sends)."""
    def do():
        metrics().errors.inc(1, {"status": _tag(status), "code": _tag(code)})
    _safely("errors", do)


def record_decision(decision: Any) -> None:
    """A routing decision of a real request (serve/router.py `Decision`): confidence and latency of
    'auto' requests, and the fallback with its reason. Named models are not routed: nothing to record."""
    def do():
        route = getattr(decision, "route", None)
        if route == "named":
            return
        best = _tag(getattr(decision, "best", None))
        confidence = finite_number(getattr(decision, "confidence", None))
        routing_ms = finite_number(getattr(decision, "routing_ms", None))
        if confidence is not None and getattr(decision, "best", None) is not None:
            metrics().routing_confidence.observe(confidence, {"model": best})
        if routing_ms is not None:
            metrics().routing_latency_ms.observe(max(routing_ms, 0.0), {"route": _tag(route, ROUTES)})
        if route == "fallback":
            metrics().fallbacks.inc(1, {"reason": fallback_kind(getattr(decision, "reason", "")), "model": best})
    _safely("routing", do)


# --------------------------------------------------------------------------- swaps, training, the registry


def record_swap(model: Any, kind: Any, outcome: Any, seconds: Any) -> None:
    """One swap of `model` (serve/swap.py) ended with `outcome` after `seconds`."""
    def do():
        tags = {"model": _tag(model), "kind": _tag(kind, SWAP_KINDS), "outcome": _tag(outcome, SWAP_OUTCOMES)}
        metrics().swaps.inc(1, tags)
        duration = finite_number(seconds)
        if duration is not None:
            metrics().swap_duration_seconds.observe(max(duration, 0.0), tags)
    _safely("swaps", do)


def record_training_run(model: Any, trigger: Any, outcome: Any, seconds: Any) -> None:
    """One retraining run (actors/scheduler.py) ended with `outcome` after `seconds`."""
    def do():
        tags = {"model": _tag(model), "trigger": trigger_kind(trigger), "outcome": run_outcome(outcome)}
        metrics().training_runs.inc(1, tags)
        duration = finite_number(seconds)
        if duration is not None:
            metrics().training_duration_seconds.observe(max(duration, 0.0), tags)
    _safely("training runs", do)


def record_promotion(model: Any, status: Any) -> None:
    """The registry's gate answered a promotion: the record's status ("serving" or "rejected")."""
    def do():
        metrics().promotions.inc(1, {"model": _tag(model), "outcome": "promoted" if status == "serving" else "rejected"})
    _safely("promotions", do)


def record_rollback(model: Any) -> None:
    _safely("rollbacks", lambda: metrics().rollbacks.inc(1, {"model": _tag(model)}))


_created: dict[str, float] = {}  # model -> epoch seconds its serving version was registered
_serving: dict[str, dict[str, float]] = {}  # model -> {"serving_version": ..., "serving_val_ppl": ...}, as last set
_ticker: threading.Thread | None = None


def _parse_time(text: Any) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


def _tick_freshness() -> None:
    now = time.time()
    for model, created in list(_created.items()):
        metrics().freshness_seconds.set(max(now - created, 0.0), {"model": model})


def _refresh_serving() -> None:
    """Set the serving gauges again to what `record_serving` last set, so they stay in the scrape."""
    for model, values in list(_serving.items()):
        for attr, value in list(values.items()):
            getattr(metrics(), attr).set(value, {"model": model})


def _freshness_loop() -> None:
    while True:
        time.sleep(FRESHNESS_TICK_S)
        _safely("freshness", _tick_freshness)
        _safely("serving", _refresh_serving)


def record_serving(records: Any) -> None:
    """Each model's serving version from the registry's records (`{model: [record, ...]}`): its version,
    validation perplexity and freshness. A daemon thread of this process keeps freshness counting up and sets
    all three again every FRESHNESS_TICK_S."""
    def do():
        global _ticker
        for model, versions in (records or {}).items():
            serving = next((r for r in versions or [] if isinstance(r, dict) and r.get("status") == "serving"), None)
            if serving is None:
                continue
            tags = {"model": _tag(model)}
            version = finite_number(serving.get("version"))
            if version is not None:
                metrics().serving_version.set(version, tags)
                _serving.setdefault(tags["model"], {})["serving_version"] = version
            ppl = finite_number((serving.get("metrics") or {}).get("val_ppl"))
            if ppl is not None:
                metrics().serving_val_ppl.set(ppl, tags)
                _serving.setdefault(tags["model"], {})["serving_val_ppl"] = ppl
            created = _parse_time(serving.get("created_at"))
            if created is not None:
                _created[tags["model"]] = created
        _tick_freshness()
        with _lock:
            if _ticker is None:
                _ticker = threading.Thread(target=_freshness_loop, name="senmon-freshness", daemon=True)
                _ticker.start()
    _safely("serving", do)


# --------------------------------------------------------------------------- ingest


def record_ingest_lag(topic: Any, partition: Any, lag: Any) -> None:
    """Messages of `topic`/`partition` not yet read; None (not known yet) records nothing."""
    def do():
        value = finite_number(lag)
        if value is not None:
            metrics().ingest_lag.set(max(value, 0.0), {"topic": _tag(topic), "partition": _tag(partition)})
    _safely("ingest lag", do)


def record_ingest_documents(domain: Any, count: Any) -> None:
    """`count` new documents of `domain` written to the dataset."""
    def do():
        value = finite_number(count)
        if value is not None and value > 0:
            metrics().ingest_domain_documents.inc(value, {"domain": _tag(domain)})
    _safely("ingest documents", do)
