"""senmon's metrics and its Grafana dashboard, without a cluster where possible.

The dashboard (docs/grafana/senmon.json) may only query metrics senmon defines (senmon/metrics.py,
ingest/metrics.py) under the names Ray's Prometheus exporter gives them, or vLLM engine metrics
whose exported names are checked against the installed vLLM and Ray. The `record_*` helpers never
raise: not without Ray, not with odd values, not when the metric objects themselves fail.
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from senmon import metrics as m

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana" / "senmon.json"

# vLLM engine metrics the dashboard uses (Ray Serve LLM turns them on with `log_engine_metrics`, the
# default): vLLM defines them in vllm/v1/metrics/loggers.py as "vllm:<name>"; its Ray stat logger
# (vllm/v1/metrics/ray_wrappers.py, RayPrometheusStatLogger) records them as `ray.util.metrics` with
# ":" replaced by "_"; Ray's exporter then adds "ray_" and the counter / histogram suffixes. Ray's own
# Serve LLM dashboard (ray/dashboard/modules/metrics/dashboards/serve_llm_dashboard_panels.py) queries
# the same exported names. {vLLM name: kind in vLLM's logger}
VLLM_METRICS = {
    "vllm:generation_tokens": "counter",  # -> ray_vllm_generation_tokens_total (tokens/s)
    "vllm:prompt_tokens": "counter",  # -> ray_vllm_prompt_tokens_total
    "vllm:time_to_first_token_seconds": "histogram",  # -> ray_vllm_time_to_first_token_seconds_bucket (TTFT)
    "vllm:num_requests_running": "gauge",  # -> ray_vllm_num_requests_running
    "vllm:num_requests_waiting": "gauge",  # -> ray_vllm_num_requests_waiting
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def _vllm_exported() -> set[str]:
    names = set()
    for name, kind in VLLM_METRICS.items():
        ray_name = re.sub(r"[^a-zA-Z0-9_]", "_", name)  # what vLLM's Ray wrapper does
        names.update(m.exported_names(m.Spec("", ray_name, kind, "")))
    return names


def _expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target and every query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            found.append((f"variable {variable['name']}", re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query)))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names (matchers, `by (...)`, `on (...)`, ...) or Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group(0)
        if text[match.end():].lstrip().startswith("(") or word in PROMQL_WORDS:
            continue  # a function or an aggregation
        names.add(word)
    return names


def test_promql_names_are_read_as_metrics_not_labels_or_functions():
    expr = ('sum by (model, route) (rate(ray_senmon_requests_total{status!="2xx", model=~"$model"}[$__rate_interval])) '
            '/ ignoring (route) group_left histogram_quantile(0.5, sum by (le) (rate(ray_x_bucket[5m])))')
    assert metric_names(expr) == {"ray_senmon_requests_total", "ray_x_bucket"}


def test_every_dashboard_query_names_only_senmon_or_verified_engine_metrics():
    allowed = m.all_exported_names() | _vllm_exported()
    expressions = _expressions()
    assert len(expressions) >= 20
    used = set()
    for title, expr in expressions:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (title, expr)
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= allowed, f"{title}: {sorted(names - allowed)} is not a metric senmon exports"
        used |= names
    # everything senmon/metrics.py defines is on the dashboard, and the engine panels are there
    for spec in m.SPECS:
        assert set(m.exported_names(spec)) & used, f"{spec.name} is on no panel"
    assert {"ray_vllm_generation_tokens_total", "ray_vllm_time_to_first_token_seconds_bucket"} <= used
    for name in ("senmon_ingest_messages", "senmon_ingest_dead_letters", "senmon_ingest_new_documents"):
        assert any(n.startswith("ray_" + name) for n in used), name


def test_dashboard_is_a_grafana_model_with_a_prometheus_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_names_are_prefixed_unique_and_tags_are_few():
    specs = m.SPECS + m.INGEST_SPECS
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) and all(n.startswith(m.PREFIX) for n in names)
    assert len({s.attr for s in m.SPECS}) == len(m.SPECS)
    for spec in specs:
        assert spec.kind in ("counter", "gauge", "histogram") and len(spec.tag_keys) <= 3, spec.name
        assert re.fullmatch(r"[a-z_]+", spec.name) and not spec.name.endswith("_total"), spec.name
        if spec.kind == "histogram":
            assert list(spec.boundaries) == sorted(spec.boundaries) and spec.boundaries[0] > 0


def test_ingest_specs_match_what_ingest_metrics_defines():
    """ingest/metrics.py creates its own series; senmon/metrics.py lists them (name, kind, tags) for the dashboard."""
    tree = ast.parse((REPO / "ingest" / "metrics.py").read_text(encoding="utf-8"))
    variables = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Tuple):
            variables[node.targets[0].id] = tuple(ast.literal_eval(node.value))
    defined = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Counter", "Gauge", "Histogram"):
            tags = ()
            for keyword in node.keywords:
                if keyword.arg == "tag_keys":
                    tags = variables[keyword.value.id] if isinstance(keyword.value, ast.Name) \
                        else tuple(ast.literal_eval(keyword.value))
            defined[ast.literal_eval(node.args[0])] = (node.func.id.lower(), tags)
    assert defined == {s.name: (s.kind, s.tag_keys) for s in m.INGEST_SPECS}


def test_exported_names_are_what_rays_prometheus_exporter_serves():
    """Ray 2.60's metrics agent exports through OpenTelemetry's Prometheus reader: drive that same recorder
    with one metric of each kind and read the text Prometheus would scrape."""
    from prometheus_client import REGISTRY, generate_latest
    from ray._private.telemetry.open_telemetry_metric_recorder import OpenTelemetryMetricRecorder

    recorder = OpenTelemetryMetricRecorder(gauge_metric_ttl_seconds=600)
    picked = {kind: next(s for s in m.SPECS if s.kind == kind) for kind in ("counter", "gauge", "histogram")}
    for kind, spec in picked.items():
        if kind == "histogram":
            recorder.register_histogram_metric(spec.name, spec.description, list(spec.boundaries))
        else:
            getattr(recorder, f"register_{kind}_metric")(spec.name, spec.description)
        recorder.set_metric_value(spec.name, {key: "x" for key in spec.tag_keys}, 1.0)
    scraped = {line.split("{")[0].split(" ")[0] for line in generate_latest(REGISTRY).decode().splitlines()
               if line and not line.startswith("#")}
    for spec in picked.values():
        assert set(m.exported_names(spec)) <= scraped, (spec.name, sorted(n for n in scraped if spec.name in n))


def test_engine_metric_names_exist_in_the_installed_vllm_and_ray():
    """Read from the installed sources (importing vLLM takes most of a minute on two cores)."""
    import importlib.util

    import ray

    vllm_dir = Path(importlib.util.find_spec("vllm").origin).parent
    loggers = (vllm_dir / "v1" / "metrics" / "loggers.py").read_text(encoding="utf-8")
    wrappers = (vllm_dir / "v1" / "metrics" / "ray_wrappers.py").read_text(encoding="utf-8")
    assert 're.sub(r"[^a-zA-Z0-9_]", "_", name)' in wrappers  # the sanitising `_vllm_exported` repeats
    ray_panels = (Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" / "dashboards" /
                  "serve_llm_dashboard_panels.py").read_text(encoding="utf-8")
    for name, kind in VLLM_METRICS.items():
        assert re.search(rf'self\._{kind}_cls\(\s*name="{re.escape(name)}"', loggers), name
        base = "ray_" + name.replace(":", "_")
        assert set(m.exported_names(m.Spec("", name.replace(":", "_"), kind, ""))) <= _vllm_exported()
        assert re.search(rf"\b{base}(_total|_bucket)?\b", ray_panels), base
        # Ray's own Serve LLM dashboard reads the same exported names (its histogram helper adds "_bucket")


# --------------------------------------------------------------------------- the helpers


def _call_every_helper(odd: bool = False) -> None:
    values = [None, "", float("nan"), float("inf"), -5, object(), "x" * 500, {"a": 1}] if odd else [None]
    decision = SimpleNamespace(route="fallback", reason="confidence 0.20 below 0.50", confidence=0.2,
                               routing_ms=0.4, best="law", specialist="generalist")
    m.record_decision(decision)
    m.record_request("law", "auto", 200)
    m.record_error(503, "timeout")
    m.record_swap("law", "in_place", "done", 2.5)
    m.record_training_run("law", "new data", "serving", 120.0)
    m.record_promotion("law", "serving")
    m.record_rollback("law")
    m.record_serving({"law": [{"status": "serving", "version": 3, "metrics": {"val_ppl": 41.5},
                               "created_at": "2020-01-02T03:04:05Z"}]})
    m.record_ingest_lag("senmon.documents", 0, 12)
    m.record_ingest_documents("law", 7)
    for value in values:
        m.record_decision(value)
        m.record_decision(SimpleNamespace(route=value, reason=value, confidence=value, routing_ms=value, best=value))
        m.record_request(value, value, value)
        m.record_error(value, value)
        m.record_swap(value, value, value, value)
        m.record_training_run(value, value, value, value)
        m.record_promotion(value, value)
        m.record_rollback(value)
        m.record_serving(value)
        m.record_serving({"law": [value, {"status": "serving", "version": value, "metrics": value, "created_at": value}]})
        m.record_ingest_lag(value, value, value)
        m.record_ingest_documents(value, value)


def test_importing_and_recording_need_no_ray():
    code = ("import sys; sys.path.insert(0, 'tests')\n"
            "import ray, senmon.metrics as m, test_metrics as t\n"
            "assert m._metrics is None\n"
            "t._call_every_helper(odd=True)\n"
            "assert not ray.is_initialized() and m._metrics is not None\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


class _Broken:
    def __getattr__(self, name):
        raise RuntimeError("the metrics agent is gone")


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        return lambda *args: self.calls.append((method, *args))


def test_helpers_swallow_failures_of_the_metrics_themselves(monkeypatch):
    monkeypatch.setattr(m, "_metrics", _Broken())
    _call_every_helper(odd=True)
    monkeypatch.setattr(m, "metrics", lambda: (_ for _ in ()).throw(ImportError("no ray here")))
    _call_every_helper(odd=True)


def test_helpers_record_bounded_tags(monkeypatch):
    fake = SimpleNamespace(**{spec.attr: _Recorder() for spec in m.SPECS})
    monkeypatch.setattr(m, "_metrics", fake)
    m.record_request("law", "auto", 503)
    m.record_request(None, None, 400)
    assert fake.requests.calls == [("inc", 1, {"model": "law", "route": "auto", "status": "5xx"}),
                                   ("inc", 1, {"model": "none", "route": "none", "status": "4xx"})]
    m.record_swap("law", "sideways", "done", -1)
    assert fake.swaps.calls == [("inc", 1, {"model": "law", "kind": "other", "outcome": "done"})]
    assert fake.swap_duration_seconds.calls[0][1] == 0.0
    m.record_training_run("law", "new data", "serving", 60)
    m.record_training_run("law", "because", "weird", math.nan)
    assert [c[2] for c in fake.training_runs.calls] == [{"model": "law", "trigger": "new_data", "outcome": "promoted"},
                                                       {"model": "law", "trigger": "other", "outcome": "other"}]
    assert len(fake.training_duration_seconds.calls) == 1  # no duration for NaN
    named = SimpleNamespace(route="named", reason="named in the request", confidence=1.0, routing_ms=0.0, best="law")
    m.record_decision(named)
    assert not fake.routing_confidence.calls and not fake.fallbacks.calls
    m.record_serving({"law": [{"status": "retired", "version": 1, "metrics": {"val_ppl": 80.0}},
                              {"status": "serving", "version": 2, "metrics": {"val_ppl": 40.0},
                               "created_at": "2020-01-02T03:04:05Z"}]})
    assert fake.serving_version.calls == [("set", 2.0, {"model": "law"})]
    assert fake.serving_val_ppl.calls == [("set", 40.0, {"model": "law"})]
    assert fake.freshness_seconds.calls[-1][1] > 0
    m.record_ingest_lag("t", 3, None)
    m.record_ingest_lag("t", 3, 9)
    assert fake.ingest_lag.calls == [("set", 9.0, {"topic": "t", "partition": "3"})]


class _Routing:
    def __init__(self, specialist, confidence, none=0.0):
        from senmon.train.routing import Route

        self.answer = Route(specialist, confidence, {specialist: confidence}, none=none)

    def route(self, texts):
        return [self.answer for _ in texts]


def test_fallback_kinds_follow_the_routers_reasons(make_config):
    """The reason strings `Router.decide` writes map onto the fallback kinds the dashboard shows."""
    from senmon.serve.router import Router

    config = make_config()
    router = Router.__new__(Router)
    router.config, router.generalist = config, config.generalist.name
    router.models = [s.name for s in config.specialists] + [router.generalist]
    generalist = {"app": "a-g", "version": 1, "quality": {"law": 60.0}}

    def decide(confidence, entries, routing=True, none=0.0):
        router.routing = _Routing("law", confidence, none) if routing else None
        router.likelihood = None
        router.entries = entries
        return router.decide("auto", "GNU General Public License")

    law = {"app": "a-law", "version": 3, "quality": {"law": 40.0}}
    cases = [
        (decide(0.2, {"law": law, router.generalist: generalist}), "low_confidence"),
        (decide(0.97, {router.generalist: generalist}), "no_serving_version"),
        (decide(0.97, {"law": {**law, "quality": {"law": 70.0}}, router.generalist: generalist}), "worse_than_fallback"),
        (decide(0.97, {router.generalist: generalist}, routing=False), "no_routing"),
        (decide(0.97, {"law": law, router.generalist: generalist}, none=0.9), "no_domain"),
    ]
    for decision, kind in cases:
        assert decision.route == "fallback" and m.fallback_kind(decision.reason) == kind, decision.reason
    assert decide(0.97, {"law": law, router.generalist: generalist}).route == "auto"


def test_recording_inside_a_ray_worker(ray_local):
    """With Ray up, real metric objects are made and recorded in a worker process."""
    import ray

    @ray.remote(num_cpus=0)
    def record() -> list[str]:
        from types import SimpleNamespace

        from senmon import metrics as inside

        decision = SimpleNamespace(route="fallback", reason="confidence 0.20 below 0.50", confidence=0.2,
                                   routing_ms=0.4, best="law")
        inside.record_decision(decision)
        inside.record_request("law", "auto", 200)
        inside.record_error(503, "timeout")
        inside.record_swap("law", "in_place", "done", 2.5)
        inside.record_training_run("law", "new data", "serving", 120.0)
        inside.record_promotion("law", "serving")
        inside.record_rollback("law")
        inside.record_serving({"law": [{"status": "serving", "version": 3, "metrics": {"val_ppl": 41.5},
                                        "created_at": "2020-01-02T03:04:05Z"}]})
        inside.record_ingest_lag("senmon.documents", 0, 12)
        inside.record_ingest_documents("law", 7)
        return sorted(vars(inside.metrics()))

    assert ray.get(record.remote(), timeout=120) == sorted(s.attr for s in m.SPECS)
