"""The router's pure logic without Ray or engines: keys, error bodies, request checks, routing text, the drain rule."""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest
from pydantic import BaseModel, ValidationError

from senmon import metrics as m
from senmon.serve.auth import Keys
from senmon.serve.errors import ApiError, from_validation
from senmon.serve.router import ROUTING_CHARS, app, prompt_text
from senmon.serve.validation import (MAX_N, check_max_tokens, json_depth_exceeds, parse_json, read_limited,
                                     validate_body)
from senmon.serve.table import LIVE_S, ServingTable


def test_keys_bearer_api_and_admin():
    keys = Keys(["user"], ["boss"])
    keys.check_api("Bearer user")
    keys.check_api("bearer boss")  # an admin key also works on /v1
    for header, status in ((None, 401), ("Bearer nope", 401), ("Basic user", 401)):
        with pytest.raises(ApiError) as caught:
            keys.check_api(header)
        assert caught.value.status == status
    keys.check_admin("Bearer boss")
    with pytest.raises(ApiError) as caught:
        keys.check_admin("Bearer user")
    assert caught.value.status == 403
    with pytest.raises(ApiError) as caught:  # API keys but no admin key: admin is off
        Keys(["user"], []).check_admin("Bearer user")
    assert caught.value.status == 403 and "no admin key" in caught.value.message


def test_errors_are_openai_shaped_and_survive_pickling():
    class Body(BaseModel):
        max_tokens: int

    with pytest.raises(ValidationError) as caught:
        Body.model_validate({"max_tokens": "many"})
    error = from_validation(caught.value)
    assert error.status == 400 and error.param == "max_tokens" and "'max_tokens'" in error.message
    again = pickle.loads(pickle.dumps(ApiError(503, "busy", code="x", headers={"Retry-After": "5"})))
    assert again.body() == {"error": {"message": "busy", "type": "service_unavailable", "param": None, "code": "x"}}
    assert again.headers == {"Retry-After": "5"}


def test_routing_reads_the_users_words():
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "法律"},
                         {"role": "user", "content": [{"type": "text", "text": "GPL"}]}]}
    assert prompt_text("chat", chat) == "法律\nGPL"
    assert prompt_text("completions", {"prompt": ["first", "second"]}) == "first"
    assert prompt_text("completions", {"prompt": [1, 2, 3]}) == ""
    # a long prompt: routing reads its beginning only, so its cost on the event loop has a bound
    book = "The licensee may redistribute the work. " * 5000  # 200,000 characters
    assert prompt_text("completions", {"prompt": book}) == book[:ROUTING_CHARS]
    long_chat = {"messages": [{"role": "user", "content": book}, {"role": "user", "content": "GPL"}]}
    assert prompt_text("chat", long_chat) == book[:ROUTING_CHARS]


def test_drain_waits_for_every_live_router_and_its_requests():
    table = ServingTable()
    epoch = table.set("law", {"app": "s-law-v2", "version": 2, "path": "/x"})
    table.poll("a", epoch - 1, {"s-law-v1": 2})
    table.poll("b", epoch, {})
    assert table.drained(epoch, "s-law-v1") == {"done": False, "routers": 2, "behind": 1, "inflight": 2}
    table.poll("a", epoch, {"s-law-v1": 1})  # on the new table, one old request still running
    assert not table.drained(epoch, "s-law-v1")["done"]
    table.poll("a", epoch, {"s-law-v1": 0})
    assert table.drained(epoch, "s-law-v1")["done"]
    table.routers["b"]["seen"] = time.monotonic() - LIVE_S - 1  # a replica gone silent does not block
    table.routers["b"]["epoch"] = 0
    assert table.drained(epoch, "s-law-v1")["done"]
    assert table.begin_swap("law") and not table.begin_swap("law")
    table.end_swap("law")
    assert table.begin_swap("law")


CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "auto", "prompt": "hi"}


@pytest.mark.parametrize("kind, body, param, words", [
    ("completions", {"model": "auto", "prompt": None}, "prompt", "null"),
    ("completions", {"model": "auto"}, "prompt", "required"),
    ("completions", {"model": "auto", "prompt": []}, "prompt", "at least 1"),
    ("completions", {"model": "auto", "prompt": [[]]}, "prompt.0", "at least 1"),
    ("completions", {"model": "auto", "prompt": 7}, "prompt", "valid string"),
    ("completions", {"prompt": "x"}, "model", "required"),
    ("completions", dict(COMPLETION, n=0), "n", "greater than or equal to 1"),
    ("completions", dict(COMPLETION, n=MAX_N + 1), "n", f"less than or equal to {MAX_N}"),
    ("completions", dict(COMPLETION, max_tokens=0), "max_tokens", "greater than or equal to 1"),
    ("completions", dict(COMPLETION, max_tokens="many"), "max_tokens", "valid integer"),
    ("completions", dict(COMPLETION, stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    ("completions", dict(COMPLETION, stop=3), "stop", "valid string"),
    ("completions", dict(COMPLETION, logprobs=6), "logprobs", "less than or equal to 5"),
    ("completions", dict(COMPLETION, temperature=2.5), "temperature", "less than or equal to 2"),
    ("completions", dict(COMPLETION, temperature=-1), "temperature", "greater than or equal to 0"),
    ("completions", dict(COMPLETION, top_p=0), "top_p", "greater than 0"),
    ("completions", dict(COMPLETION, top_p=1.5), "top_p", "less than or equal to 1"),
    ("completions", dict(COMPLETION, presence_penalty=3), "presence_penalty", "less than or equal to 2"),
    ("chat", {"model": "auto"}, "messages", "required"),
    ("chat", {"model": "auto", "messages": None}, "messages", "null"),
    ("chat", {"model": "auto", "messages": []}, "messages", "at least 1"),
    ("chat", {"model": "auto", "messages": ["hi"]}, "messages.0", "dictionary"),
    ("chat", {"model": "auto", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "wizard"),
    ("chat", {"model": "auto", "messages": [{"content": "hi"}]}, "messages.0.role", "role"),
    ("chat", {"model": "auto", "messages": [{"role": "user"}]}, "messages.0.content", "required"),
    ("chat", {"model": "auto", "messages": [{"role": "system", "content": None}, {"role": "user", "content": "x"}]},
     "messages.0.content", "valid string"),
    ("chat", {"model": "auto", "messages": [{"role": "user", "content": 5}]}, "messages.0.content", "valid string"),
    ("chat", {"model": "auto", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0",
     "needs 'text'"),
    ("chat", {"model": "auto", "messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
     "messages.1.content", "tool_calls"),
    ("chat", {"model": "auto", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id", "required"),
    ("chat", dict(CHAT, top_logprobs=3), "top_logprobs", "logprobs: true"),
    ("chat", dict(CHAT, logprobs=True, top_logprobs=21), "top_logprobs", "less than or equal to 20"),
    ("chat", dict(CHAT, max_completion_tokens=0), "max_completion_tokens", "greater than or equal to 1"),
    ("route", {}, "prompt", "'prompt' (a string) or 'messages'"),
    ("route", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "wizard"),
])
def test_bad_request_bodies_are_400_naming_the_field(kind, body, param, words):
    with pytest.raises(ApiError) as caught:
        validate_body(kind, body)
    error = caught.value
    assert error.status == 400 and error.param == param, error.body()
    assert words in error.message, error.body()
    assert param.split(".")[0] in error.message  # the message names the field too


def test_good_request_bodies_pass_with_vllm_extras():
    validate_body("completions", dict(COMPLETION, prompt=["a", "b"], n=MAX_N, stop=["a"] * 4, logprobs=5,
                                      temperature=0, top_p=1, ignore_eos=True, top_k=5))
    validate_body("completions", dict(COMPLETION, prompt=[[1, 2], [3]], stop="\n", max_tokens=1))
    validate_body("chat", {"model": "law", "logprobs": True, "top_logprobs": 20, "max_completion_tokens": 4,
                           "messages": [{"role": "developer", "content": "be brief"},
                                        {"role": "system", "content": [{"type": "text", "text": "really"}]},
                                        {"role": "user", "content": [{"type": "text", "text": "GPL?"}]},
                                        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]},
                                        {"role": "tool", "tool_call_id": "1", "content": "ok"},
                                        {"role": "function", "name": "f", "content": None},
                                        {"role": "assistant", "content": "yes", "reasoning_content": "kept"}]})
    validate_body("route", {"prompt": "text"})
    with pytest.raises(ApiError) as caught:
        validate_body("chat", [CHAT])
    assert "JSON object" in caught.value.message


def test_max_tokens_may_not_exceed_the_context():
    check_max_tokens({"max_tokens": 128}, "law", 128)
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(ApiError) as caught:
            check_max_tokens({field: 129}, "law", 128)
        assert caught.value.status == 400 and caught.value.param == field and "128" in caught.value.message


def test_body_size_limit_before_and_while_reading():
    read = []

    async def chunks(count: int, size: int = 1000):
        for _ in range(count):
            read.append(size)
            yield b"x" * size

    async def body(header, count):
        return await read_limited(header, chunks(count), 4096)

    with pytest.raises(ApiError) as caught:  # Content-Length over the limit: refused before a byte is read
        asyncio.run(body("20000000", 20000))
    assert caught.value.status == 413 and "4096" in caught.value.message and read == []
    with pytest.raises(ApiError) as caught:  # chunked, no Content-Length: stops as soon as it passes the limit
        asyncio.run(body(None, 20000))
    assert caught.value.status == 413 and sum(read) == 5000
    assert asyncio.run(body(None, 4)) == b"x" * 4000
    assert asyncio.run(body("4000", 4)) == b"x" * 4000
    with pytest.raises(ApiError) as caught:
        asyncio.run(body("lots", 1))
    assert caught.value.status == 400 and "Content-Length" in caught.value.message


def test_json_nesting_limit_without_recursion():
    started = time.perf_counter()
    with pytest.raises(ApiError) as caught:
        parse_json(b"[" * 100_000 + b"]" * 100_000, 64)
    assert caught.value.status == 400 and "64" in caught.value.message and caught.value.code == "json_too_deep"
    assert time.perf_counter() - started < 1
    assert parse_json(b"[" * 64 + b"]" * 64, 64) is not None
    with pytest.raises(ApiError):
        parse_json(b"[" * 65 + b"]" * 65, 64)
    text = b'{"prompt": "[[[[{{{{\\\"[[[[", "stop": [["x"]]}'  # brackets inside strings do not count
    assert not json_depth_exceeds(text, 3) and json_depth_exceeds(text, 2)
    assert parse_json(b"", 64) is None
    for raw in (b'{"model": "auto", "messages": [', b"\xff\xfe", b"[" * 70):
        with pytest.raises(ApiError) as caught:
            parse_json(raw, 64)
        assert caught.value.status == 400


def test_openapi_declares_the_request_bodies():
    schema = app.openapi()
    names = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
             "/v1/route": "RouteRequest"}
    for path, name in names.items():
        operation = schema["paths"][path]["post"]
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{name}"
        assert {"400", "413", "429"} <= set(operation["responses"])
    for path in ("/v1/models", "/v1/models/{model}"):
        assert {"401", "429"} <= set(schema["paths"][path]["get"]["responses"])
    components = schema["components"]["schemas"]
    assert components["CompletionRequest"]["properties"]["n"]["anyOf"][0]["maximum"] == MAX_N
    assert "prompt" in components["CompletionRequest"]["required"]
    assert {"UserMessage", "ToolMessage", "ErrorBody"} <= set(components)
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            refs.update(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    assert {ref.rsplit("/", 1)[-1] for ref in refs} <= set(components)


class _Routing:  # the routing model's interface, fixed answers
    def __init__(self, specialist, confidence, none=0.0):
        from senmon.train.routing import Route

        self.answer = Route(specialist, confidence, {specialist: confidence}, none=none)

    def route(self, texts):
        return [self.answer for _ in texts]


def _router(make_config, law_ppl: float, fallback_ppl: float | None, quality_aware: bool = True):
    from senmon.serve.router import Router

    config = make_config()
    config = config.model_copy(update={"serve": config.serve.model_copy(update={"quality_aware": quality_aware})})
    router = Router.__new__(Router)
    router.config, router.generalist = config, config.generalist.name
    router.models = [s.name for s in config.specialists] + [router.generalist]
    router.routing, router.likelihood = _Routing("law", 0.97), None
    router.entries = {"law": {"app": "a-law", "version": 3, "quality": {"law": law_ppl, "code": 500.0}},
                      router.generalist: {"app": "a-g", "version": 1,
                                          "quality": None if fallback_ppl is None else {"law": fallback_ppl}}}
    return router


def test_route_explains_with_the_classifier_run_once(make_config):
    class _Counting(_Routing):
        calls = 0

        def route(self, texts):
            self.calls += 1
            return super().route(texts)

    router = _router(make_config, law_ppl=40.0, fallback_ppl=60.0)
    router.routing = _Counting("law", 0.97)
    explained = asyncio.run(router.route("GNU General Public License"))
    assert router.routing.calls == 1
    assert (explained["specialist"], explained["route"], explained["scores"]) == ("law", "auto", {"law": 0.97})
    assert explained["threshold"] == router.config.serve.confidence_threshold
    assert asyncio.run(router.route("   "))["route"] == "fallback" and router.routing.calls == 1  # no text: no call


def test_auto_sends_to_a_specialist_only_where_it_beats_the_fallback(make_config):
    better = _router(make_config, law_ppl=40.0, fallback_ppl=60.0).decide("auto", "GNU General Public License")
    assert (better.specialist, better.route) == ("law", "auto")
    assert better.compared == {"version": 3, "specialist_val_ppl": pytest.approx(40.0), "fallback_version": 1,
                               "fallback_val_ppl": pytest.approx(60.0), "beats_fallback": True}

    router = _router(make_config, law_ppl=70.0, fallback_ppl=60.0)
    worse = router.decide("auto", "GNU General Public License")
    assert (worse.specialist, worse.route, worse.best) == (router.generalist, "fallback", "law")
    assert "law v3 (validation perplexity 70.0 on its domains) does not beat generalist v1 (60.0)" in worse.reason
    explained = router.explain("GNU General Public License")
    assert explained["compared"]["beats_fallback"] is False and explained["quality_aware"] is True

    assert router.decide("law", "x").specialist == "law"  # a model named directly is never second-guessed
    off = _router(make_config, law_ppl=70.0, fallback_ppl=60.0, quality_aware=False).decide("auto", "GPL")
    assert off.specialist == "law" and off.compared is None
    unknown = _router(make_config, law_ppl=70.0, fallback_ppl=None).decide("auto", "GPL")
    assert unknown.specialist == "law" and unknown.compared is None  # no numbers: routing alone decides


class _Scorer:
    """A stand-in for serve/likelihood.py's scorer: fixed nats/token per model."""

    def __init__(self, nll: dict[str, float]):
        self.nll, self.models, self.ready, self.calls = nll, dict.fromkeys(nll), True, 0

    def timed_nll(self, text, names):
        self.calls += 1
        return {n: self.nll[n] for n in names}, 3.0


def test_the_likelihood_second_opinion_decides_only_when_the_classifier_is_unsure(make_config):
    from senmon.serve.likelihood import decide

    router = _router(make_config, law_ppl=40.0, fallback_ppl=60.0)
    router.entries["code"] = {"app": "a-code", "version": 2, "quality": None}
    below = router.config.serve.second_opinion_below
    router.likelihood = _Scorer({"law": 3.1, "code": 2.5, router.generalist: 2.9})

    sure = router.decide("auto", "GNU General Public License")  # 0.97: the classifier alone
    assert (sure.specialist, sure.second_opinion, router.likelihood.calls) == ("law", None, 0)

    router.routing = _Routing("law", below - 0.01)
    unsure = router.decide("auto", "GNU General Public License")  # code explains it best, by 0.4 nats/token
    assert (unsure.specialist, unsure.route, unsure.best) == ("code", "auto", "code")
    assert unsure.second_opinion["nll"] == {"code": 2.5, router.generalist: 2.9, "law": 3.1}
    assert unsure.second_opinion["gain"] == pytest.approx(0.4) and "code saves 0.400 nats/token" in unsure.reason

    router.likelihood = _Scorer({"law": 3.0, "code": 2.95, router.generalist: 2.9})  # none beats the generalist
    none = router.decide("auto", "text of no domain")
    assert (none.specialist, none.route, none.best) == (router.generalist, "fallback", "code")
    assert m.fallback_kind(none.reason) == "likelihood"

    # at the router, the forward pass runs in a worker thread while the event loop goes on; the same decision
    import asyncio
    import threading

    class _Threaded(_Scorer):
        def timed_nll(self, text, names):
            self.thread = threading.current_thread()
            return super().timed_nll(text, names)

    router.likelihood = _Threaded({"law": 3.1, "code": 2.5, router.generalist: 2.9})
    router.routing = _Routing("law", below - 0.01)
    threaded = asyncio.run(router.decide_async("auto", "GNU General Public License"))
    assert (threaded.specialist, threaded.second_opinion["nll"]) == ("code", unsure.second_opinion["nll"])
    assert router.likelihood.thread is not threading.main_thread() and router.likelihood.calls == 1
    assert threaded.routing_ms > 0 and threaded.reason == unsure.reason
    router.routing = _Routing("law", below + 0.01)  # sure: no thread, no forward pass
    assert asyncio.run(router.decide_async("auto", "GPL")).second_opinion is None and router.likelihood.calls == 1
    router.likelihood = _Scorer({"law": 3.0, "code": 2.95, router.generalist: 2.9})

    router.likelihood.ready = False  # weights not loaded yet: the confidence threshold decides, as before
    assert router.decide("auto", "GNU General Public License").second_opinion is None

    assert decide({"law": 2.0, "g": 2.1}, "g", margin=0.2).chosen is None
    assert decide({"law": 2.0, "g": 2.3}, "g", margin=0.2).chosen == "law"
    assert decide({"law": 2.0, "code": 1.0}, "g", margin=0.2).chosen == "code"  # no generalist: the best
    with pytest.raises(ValueError):
        decide({"g": 1.0}, "g", margin=0.0)


# ----------------------------------------------------------------- rate limits (serve/ratelimit.py)


class _Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rate_limit_burst_then_refill_with_retry_after():
    from senmon.serve.ratelimit import RateLimiter

    clock = _Clock()
    limiter = RateLimiter(requests_per_minute=6, burst=3, clock=clock)  # one token per 10 s
    assert [limiter.check("a") for _ in range(3)] == [None, None, None]  # the burst
    assert limiter.check("a") == 10  # empty: a whole token away
    clock.now += 4
    assert limiter.check("a") == 6  # refused requests spend nothing; 6 s of refill still missing
    clock.now += 6
    assert limiter.check("a") is None and limiter.check("a") == 10
    clock.now += 0.5
    assert limiter.check("a") == 10  # 9.5 s, rounded up: Retry-After is whole seconds, never 0
    clock.now += 1000  # a long rest refills to the burst, not beyond
    assert [limiter.check("a") for _ in range(4)] == [None, None, None, 10]


def test_rate_limit_keys_are_isolated_and_open_mode_buckets_by_host():
    from senmon.serve.ratelimit import RateLimiter, client_key

    limiter = RateLimiter(requests_per_minute=60, burst=1, clock=_Clock())
    alice, bob = client_key("key-alice", "10.0.0.1"), client_key("key-bob", "10.0.0.1")
    assert alice != bob and "key-alice" not in alice  # by key, whatever the host; the key itself is not kept
    assert client_key("key-alice", "10.0.0.9") == alice
    assert limiter.check(alice) is None and limiter.check(alice) == 1
    assert limiter.check(bob) is None  # alice's empty bucket is not bob's
    host = client_key(None, "127.0.0.1")  # no key (the API is open): the client host's bucket
    assert host == "host:127.0.0.1" and client_key(None, None) == "host:unknown"
    assert limiter.check(host) is None and limiter.check(client_key(None, "127.0.0.1")) == 1
    assert limiter.check(client_key(None, "127.0.0.2")) is None


def test_rate_limit_memory_is_bounded():
    from senmon.serve.ratelimit import RateLimiter

    clock = _Clock()
    limiter = RateLimiter(requests_per_minute=60, burst=2, max_keys=3, clock=clock)  # full again after 2 s
    for key in ("a", "b", "c"):
        limiter.check(key)
    clock.now += 1
    limiter.check("a")  # a is now the most recently used
    limiter.check("d")  # no room: the least recently used (b) goes, a and c stay
    assert len(limiter) == 3 and set(limiter.buckets) == {"c", "a", "d"}
    clock.now += 1.5  # c has been idle 2.5 s: full again, the same as a new bucket, so it is dropped
    limiter.check("a")
    assert set(limiter.buckets) == {"a", "d"}
    clock.now += 10_000
    limiter.check("e")  # every idle bucket goes
    assert set(limiter.buckets) == {"e"}


def test_rate_limit_from_config_and_bad_arguments(make_config):
    from senmon.serve.ratelimit import RateLimiter

    assert RateLimiter.from_config(make_config().http.rate_limit) is None  # off in the embedded config
    on = RateLimiter.from_config(make_config(http={"rate_limit": {"requests_per_minute": 120}}).http.rate_limit)
    assert (on.requests_per_minute, on.burst) == (120, 120)  # burst defaults to a minute's worth
    for args in ((0, 1), (-5, None), (60, 0)):
        with pytest.raises(ValueError):
            RateLimiter(*args)


class _Request:  # the parts of a starlette Request that the key check reads
    def __init__(self, authorization=None, host="127.0.0.1"):
        self.headers = {"authorization": authorization} if authorization else {}
        self.client = type("Client", (), {"host": host})() if host else None


def test_v1_key_check_answers_429_with_retry_after(make_config):
    import json

    from senmon.serve.router import Router
    from senmon.serve.ratelimit import RateLimiter

    router = Router.__new__(Router)
    router.keys, router.limiter = Keys(["k1", "k2"], []), RateLimiter(6, 1, clock=_Clock())
    router._check_api(_Request("Bearer k1"))
    with pytest.raises(ApiError) as caught:
        router._check_api(_Request("Bearer k1", host="10.0.0.2"))  # another host, the same key: the same bucket
    error = caught.value
    assert error.status == 429 and error.headers == {"Retry-After": "10"}
    assert error.body()["error"]["code"] == "rate_limit_exceeded" and error.type == "rate_limit_error"
    assert "6 requests per minute" in error.message and "retry after 10 s" in error.message
    response = error.response()
    assert response.status_code == 429 and response.headers["retry-after"] == "10"
    assert json.loads(response.body)["error"]["code"] == "rate_limit_exceeded"
    router._check_api(_Request("Bearer k2"))  # another key has its own bucket
    with pytest.raises(ApiError) as caught:  # a wrong key is 401 and spends nothing
        router._check_api(_Request("Bearer nope"))
    assert caught.value.status == 401 and len(router.limiter) == 2

    router.keys, router.limiter = Keys([], []), RateLimiter(6, 1, clock=_Clock())  # open: by client host
    router._check_api(_Request("Bearer anything", host="127.0.0.1"))
    with pytest.raises(ApiError):
        router._check_api(_Request("Bearer something-else", host="127.0.0.1"))  # a made-up key is no new bucket
    router._check_api(_Request(host="127.0.0.2"))
    router.limiter = None  # off: never refused
    for _ in range(20):
        router._check_api(_Request())


# ----------------------------------------------------------------- a replica dying under a request


class _DyingEngine:
    """A Serve handle whose replica dies under the first `deaths` requests (raises `error` before any output)."""

    def __init__(self, deaths: int, error: Exception):
        self.deaths, self.error, self.calls = deaths, error, 0
        self.completions = self

    def remote(self, request):
        self.calls += 1
        engine = self

        class Stream:
            async def __anext__(self):
                if engine.calls <= engine.deaths:
                    raise engine.error
                return {"text": "answered"}

        return Stream()


def test_a_request_whose_replica_died_is_retried_until_the_replacement_answers(make_config):
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from senmon.serve.router import Decision, Router

    def router(engine, timeout_s: float = 120.0):
        config = make_config()
        config = config.model_copy(update={"serve": config.serve.model_copy(update={"request_timeout_s": timeout_s})})
        r = Router.__new__(Router)
        r.config, r.inflight = config, {}
        r.entries = {"law": {"app": "a-law", "version": 3}}
        r.handles = {"a-law": engine}
        return r

    def start(r):
        return asyncio.run(r._start("completions", object(), Decision("law", None, 1.0, 0.0, "named")))

    engine = _DyingEngine(3, ActorDiedError())
    r = router(engine)
    first, _, release = start(r)
    assert first == {"text": "answered"} and engine.calls == 4  # three deaths, then Serve's replacement answers
    assert r.inflight == {"a-law": 1}  # counted once, for the attempt that answered
    release()
    assert r.inflight == {"a-law": 0}

    for engine, timeout_s in ((_DyingEngine(1, BackPressureError(10, 10)), 120.0),  # not a death: not retried
                              (_DyingEngine(10**6, ActorDiedError()), 1.5)):  # never back: until the timeout
        r = router(engine, timeout_s)
        started = time.monotonic()
        with pytest.raises(ApiError) as caught:
            start(r)
        assert caught.value.status == 503 and "no healthy replica" in caught.value.message
        assert time.monotonic() - started < timeout_s and r.inflight == {"a-law": 0}
    assert engine.calls > 1


def test_text_the_routing_model_puts_in_no_domain_goes_to_the_fallback_without_a_second_opinion(make_config):
    """A routing model trained with text of no domain (its `none` class, data/routing's Debian documentation) sends a
    prompt to the generalist when that class's probability reaches `serve.none_threshold`; below it, the specialists'
    own confidence decides as before (and may ask the second opinion)."""
    router = _router(make_config, law_ppl=40.0, fallback_ppl=60.0)
    router.entries["code"] = {"app": "a-code", "version": 2, "quality": None}
    router.likelihood = _Scorer({"law": 3.1, "code": 2.5, router.generalist: 2.9})
    threshold = router.config.serve.none_threshold

    router.routing = _Routing("law", 0.5, none=threshold)  # unsure among the specialists too: still no second opinion
    nowhere = router.decide("auto", "apt-get install the package")
    assert (nowhere.specialist, nowhere.route, nowhere.best, nowhere.second_opinion) == (
        router.generalist, "fallback", "law", None)
    assert f"no specialist's domain (none {threshold:.2f}" in nowhere.reason and router.likelihood.calls == 0
    assert asyncio.run(router.decide_async("auto", "apt-get install the package")).route == "fallback"
    assert router.likelihood.calls == 0 and m.fallback_kind(nowhere.reason) == "no_domain"
    assert router.explain("apt-get install the package")["none_threshold"] == threshold

    router.routing = _Routing("law", 0.97, none=threshold - 0.01)  # under it: the specialist, as without the class
    assert router.decide("auto", "GNU General Public License").specialist == "law"
    router.routing = _Routing("law", 0.5, none=threshold - 0.01)  # and an unsure classifier asks the likelihood
    assert router.decide("auto", "GNU General Public License").specialist == "code" and router.likelihood.calls == 1
