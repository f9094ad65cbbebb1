"""The router: senmon's one front door, a FastAPI ingress deployment on Ray Serve.

OpenAI-compatible `POST /v1/chat/completions` and `POST /v1/completions` (with `stream: true`
as server-sent events), `GET /v1/models`, plus `POST /v1/route` (explain a routing decision
without generating) and the admin endpoints `POST /admin/promote|rollback|reload`. `GET /status` is a status
page for people and `GET /status/data` its data as JSON (serve/status_page.py, senmon/status.py).

`model: "auto"` routes by content with the routing model (train/routing.py). A prompt it gives at least
`serve.none_threshold` probability of belonging to no specialist's domain (its `none` class) goes to the generalist.
Where it is less sure than `serve.second_opinion_below` of its specialist, the serving models' own likelihood of
the prompt decides (serve/likelihood.py): the
specialist that explains it best, or the generalist when none beats it by `serve.likelihood_margin` nats per
token. Until the router holds those models (a second or two after start or a swap), a best score below
`serve.confidence_threshold` goes to the generalist. A model's own name sends there directly.
Each answer says who answered and how sure the router was, in the JSON body
(`"senmon": {"specialist", "version", "confidence", "routing_ms", ...}`) and in headers
(`x-senmon-specialist`, `x-senmon-version`, `x-senmon-confidence`, `x-senmon-routing-ms`).

The router holds no engines. It forwards vLLM's own request objects to the serving version's
`LLMServer` application through a Serve handle, picked from the serving table (serve/table.py),
which it polls in the background. It counts its requests in flight per application and reports
them, so a swap can drain the old version before removing it. A request that finds its
application gone because a swap just removed it is retried once on the new one; one whose engine replica
died before it answered is retried until Serve's replacement answers (within `serve.request_timeout_s`).
A stream that has already sent tokens is never retried: it ends with a 503 error event.

The same calls work in-process through the Serve handle, without HTTP, keys or rate limits:
    handle = serve.get_app_handle("senmon")
    await handle.chat.remote({"model": "auto", "messages": [...]})           # -> dict
    await handle.completions.remote({"model": "law", "prompt": "..."})      # -> dict
    async for chunk in handle.options(stream=True).chat_stream.remote({...}):  # -> dict chunks
    await handle.route.remote("some text")                                   # -> decision dict
    await handle.list_models.remote()                                        # -> [model dicts]
(From synchronous code, `.result()` on the response instead of `await`.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import ray
from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve
from starlette.responses import JSONResponse, StreamingResponse

from senmon.config import NO_DOMAIN, SenmonConfig, load_config, parse_config
from senmon.metrics import record_decision, record_error, record_request
from senmon.serve.auth import Keys
from senmon.serve.errors import ApiError, from_validation, install, rate_limited, responses, unavailable
from senmon.serve.likelihood import LikelihoodScorer, decide
from senmon.serve.ratelimit import RateLimiter, client_key
from senmon.serve.status_page import DATA_ROUTE, PAGE_ROUTE, RouterStatus, page_response
from senmon.serve.validation import (body_doc, check_max_tokens, parse_json, read_limited, request_schemas,
                                     validate_body)
from senmon.serve.specialist import ENGINE_PREFIX

log = logging.getLogger("senmon.serve")
POLL_S = 0.2
AUTO = "auto"


def as_config(config: SenmonConfig | dict | str | Path) -> SenmonConfig:
    """A config given as the object, a mapping (model_dump) or a YAML path (Serve config args)."""
    if isinstance(config, SenmonConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config, source="serve args")
    return load_config(config)


ROUTING_CHARS = 2000  # what routing reads of a prompt: as long as the router's training documents (data/routing)


def prompt_text(kind: str, body: dict) -> str:
    """The text the routing model reads: the user's messages, or the prompt, up to its first ROUTING_CHARS
    characters. Routing is decided on the event loop, and its cost grows with the text (hashing n-grams,
    tokenizing for the second opinion), so a long prompt is not allowed to hold every other request up; the
    second opinion reads only the first few dozen tokens anyway."""
    return _prompt_text(kind, body)[:ROUTING_CHARS]


def _prompt_text(kind: str, body: dict) -> str:
    if kind == "chat":
        parts = []
        for message in body.get("messages") or []:
            if not isinstance(message, dict) or message.get("role", "user") != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
    return prompt if isinstance(prompt, str) else ""


@dataclass
class Decision:
    specialist: str  # who answers
    version: int | None
    confidence: float  # the router's best score (1.0 for a model named directly)
    routing_ms: float
    route: str  # "auto", "named", or "fallback" (auto, sent to the generalist)
    best: str | None = None  # the routing model's first choice
    reason: str = ""
    compared: dict | None = None  # auto: the validation perplexities weighed against the fallback's
    second_opinion: dict | None = None  # auto, classifier unsure: each model's nats/token on the prompt, and the call

    def headers(self) -> dict[str, str]:
        return {"x-senmon-specialist": self.specialist, "x-senmon-version": str(self.version),
                "x-senmon-confidence": f"{self.confidence:.4f}", "x-senmon-routing-ms": f"{self.routing_ms:.3f}"}


_VERSION_TAG = re.compile(r'"senmon_version": (\d+)')


def engine_version(item: Any) -> int | None:
    """The `senmon_version` an engine replica put on its first output (serve/engine.py), if any."""
    if isinstance(item, str):
        found = _VERSION_TAG.search(item[:200])
        return int(found.group(1)) if found else None
    value = getattr(item, "senmon_version", None)
    if value is None:
        value = (getattr(item, "model_extra", None) or {}).get("senmon_version")
    return int(value) if isinstance(value, int) else None


def _engine_error(error, model: str, max_model_len: int, kind: str) -> ApiError:
    """An engine's ErrorResponse as our error; a too-long prompt names the model's context limit."""
    info = error.error
    message, status = info.message, int(info.code or 400)
    if "maximum context length" in message or info.param == "input_tokens":
        return ApiError(400, f"the prompt is longer than {model}'s context of {max_model_len} tokens: {message}",
                        param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    if status == 404:
        return ApiError(404, message, param="model", code="model_not_found")
    return ApiError(status if 400 <= status < 600 else 500, message, param=info.param, code=str(info.type or ""))


def _count(decision: Decision | None, error: BaseException | None = None) -> None:
    """One generation request in the metrics: who answered, the route, and the status it ended with."""
    status = 200 if error is None else error.status if isinstance(error, ApiError) else 500
    record_request(decision.specialist if decision else None, decision.route if decision else None, status)


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, RayServeException

    return (RayActorError, ActorDiedError, ActorUnavailableError, BackPressureError, RayServeException)


def _client_error(error: BaseException) -> ApiError | None:
    """vLLM's request errors (`VLLMValidationError`, raised here or in an engine) as a 400 naming the field."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # pragma: no cover - vLLM is always there with ray.serve.llm
        return None
    cause = error if isinstance(error, VLLMClientError) else getattr(error, "cause", None)
    if not isinstance(cause, VLLMClientError):
        return None
    param = getattr(cause, "parameter", None)
    message = str(cause.args[0]) if cause.args else str(cause)
    return ApiError(400, f"'{param}': {message}" if param else message, param=param, code="invalid_value")


class _Api(FastAPI):
    """The routes read their raw bodies (size and nesting are checked before parsing), so FastAPI does not
    see the request models; `body_doc` names them in each route and this adds their schemas."""

    def openapi(self) -> dict:
        if self.openapi_schema is None:
            schema = super().openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas())
        return self.openapi_schema


# Documented answers besides the errors: a generation's 200 is JSON, or SSE with `stream: true`; an admin call
# with `"wait": false` is 202 with the swap's id to follow.
_STREAMED = {200: {"description": "the completion; with `stream: true`, server-sent events (the first has `senmon`)",
                   "content": {"text/event-stream": {}}}}
_FOLLOW = {202: {"description": '`"wait": false`: the swap goes on; `follow` is its state (GET /admin/swaps/{id})',
                 "content": {"application/json": {"schema": {"type": "object"}}}}}

app = _Api(title="senmon", description="One LLM made of many small specialists, OpenAI-compatible.")
install(app)


@serve.ingress(app)
class Router:
    """The ingress deployment; arguments: the config, the registry actor, the serving table actor."""

    async def __init__(self, config: Any, registry: Any = None, table: Any = None):
        from senmon.actors.registry import REGISTRY_ACTOR
        from senmon.serve.table import get_or_create_table
        from senmon.train.routing import load_router

        # vLLM's request models: importing them takes seconds (tens under load), so at start, not in the first request
        import ray.serve.llm.openai_api_models  # noqa: F401

        self.config = as_config(config)
        self.keys = Keys.from_config(self.config.http)
        self.limiter = RateLimiter.from_config(self.config.http.rate_limit)  # None: no limit
        namespace = self.config.ray.namespace
        self.registry = registry if not isinstance(registry, (str, type(None))) else \
            ray.get_actor(registry or REGISTRY_ACTOR, namespace=namespace)
        self.table = table or get_or_create_table(self.config.serve.app_name, namespace,
                                                  self.config.storage_root)
        self.generalist = self.config.generalist.name
        self.models = [s.name for s in self.config.specialists] + [self.generalist]
        self.routing = load_router(self.config.storage_root)
        self.likelihood = LikelihoodScorer(self.config.serve.likelihood_tokens, self.config.serve.likelihood_threads) \
            if self.config.serve.second_opinion else None
        self._likelihood_sync: asyncio.Task | None = None
        self.replica = uuid.uuid4().hex[:12]
        self.status_view = RouterStatus(self.config, self.replica)  # /status: this replica's routing mix, admin swaps
        self.inflight: dict[str, int] = {}
        self.handles: dict[str, Any] = {}
        self.epoch, self.entries, self.routing_gen = -1, {}, 0
        await self._poll()
        if not self.entries:
            await self._seed_from_registry()
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        if self.routing is None:
            log.warning("no routing model under %s: 'auto' goes to the generalist", self.config.storage_root)

    # ----------------------------------------------------------------- serving table

    async def _poll(self) -> None:
        reply = await self.table.poll.remote(self.replica, self.epoch, self.inflight)
        if reply is not None:
            self.epoch, self.entries, routing_gen = reply
            self._sync_likelihood()
            if routing_gen != self.routing_gen:
                from senmon.train.routing import load_router

                self.routing, self.routing_gen = load_router(self.config.storage_root), routing_gen

    def _sync_likelihood(self) -> None:
        """Load the serving weights the second opinion lacks, off the event loop, one sync at a time."""
        if self.likelihood is None or not self.likelihood.wanted(self.entries):
            return
        if self._likelihood_sync is None or self._likelihood_sync.done():
            entries = dict(self.entries)

            async def sync():
                try:
                    loaded = await asyncio.to_thread(self.likelihood.sync, entries)
                    if loaded:
                        log.info("second opinion: loaded %s", ", ".join(loaded))
                except Exception:  # the classifier alone routes meanwhile; the next poll tries again
                    log.exception("second opinion: loading serving weights failed")

            self._likelihood_sync = asyncio.get_running_loop().create_task(sync())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self._poll()
            except Exception:  # the table restarting: keep the last known table and try again
                log.exception("serving table poll failed")

    async def _seed_from_registry(self) -> None:
        """Applications deployed from a Serve config (not `deploy`) find their pointers from the registry."""
        from senmon.serve.specialist import app_name

        for model in self.models:
            record = await self.registry.current.remote(model)
            if record is not None:
                entry = {"app": app_name(self.config, model, record["version"]), "version": record["version"],
                         "path": record["path"], "quality": (record.get("metrics") or {}).get("val_ppl_by_domain")}
                await self.table.set_if_absent.remote(model, entry)
        self.epoch = -1
        await self._poll()

    def _handle(self, app_name: str, model: str):
        if app_name not in self.handles:
            self.handles[app_name] = serve.get_deployment_handle(ENGINE_PREFIX + model, app_name).options(stream=True)
        return self.handles[app_name]

    # ----------------------------------------------------------------- routing

    def _max_model_len(self, model: str) -> int:
        return self.config.context_length(model)

    def _version(self, model: str) -> int | None:
        entry = self.entries.get(model)
        return entry["version"] if entry else None

    def decide(self, requested: Any, text: str, *, routed: Any = None, nll: tuple | None = None,
               started: float | None = None) -> Decision:
        """Where `requested` goes for `text`. `routed`, `nll` and `started`: what decide_async already computed (the
        classifier's route, the second opinion's (nats/token, ms), when it began), so nothing is done twice."""
        if not isinstance(requested, str) or not requested:
            raise ApiError(400, "'model' is required: 'auto', a specialist's name or the generalist's",
                           param="model", code="missing_model")
        if requested != AUTO:
            if requested not in self.models:
                raise ApiError(404, f"the model '{requested}' does not exist; available: "
                                    f"{', '.join([AUTO, *self.models])}", param="model", code="model_not_found")
            return Decision(requested, self._version(requested), 1.0, 0.0, "named", requested, "named in the request")
        started = started or time.perf_counter()
        if self.routing is None or not text.strip():
            best, confidence, none = None, 0.0, 0.0
        else:
            route = routed or self.routing.route([text])[0]
            best, confidence, none = route.specialist, route.confidence, route.none
        threshold, none_threshold = self.config.serve.confidence_threshold, self.config.serve.none_threshold
        second = self._second_opinion(text, best, confidence, none, nll)
        elapsed = (time.perf_counter() - started) * 1000
        if best is None:
            chosen, route, reason = self.generalist, "fallback", "no routing model or no text"
        elif none >= none_threshold:
            chosen, route, reason = self.generalist, "fallback", (
                f"the routing model puts the text in no specialist's domain ({NO_DOMAIN} {none:.2f}, at least "
                f"{none_threshold:.2f}); else {best} {confidence:.2f}")
        elif second is not None:
            chosen = second.pop("chosen")
            route = "fallback" if chosen is None else "auto"
            chosen, best = chosen or self.generalist, second["best"]
            reason = f"confidence {confidence:.2f} below {self.config.serve.second_opinion_below:.2f}; {second['reason']}"
        elif confidence < threshold:
            chosen, route, reason = self.generalist, "fallback", f"confidence {confidence:.2f} below {threshold:.2f}"
        elif best not in self.entries:
            chosen, route, reason = self.generalist, "fallback", f"{best} has no serving version"
        else:
            chosen, route, reason = best, "auto", f"confidence {confidence:.2f}"
        compared = self.compare_with_fallback(best) if best in self.entries else None
        if route == "auto" and compared is not None and not compared["beats_fallback"]:
            chosen, route = self.generalist, "fallback"
            reason += (f"; {best} v{compared['version']} (validation perplexity {compared['specialist_val_ppl']:.1f} "
                       f"on its domains) does not beat {self.generalist} v{compared['fallback_version']} "
                       f"({compared['fallback_val_ppl']:.1f})")
        if chosen == self.generalist and chosen not in self.entries and best in self.entries:
            chosen, route, reason = best, "auto", reason + "; no generalist serving, so the best specialist answers"
        return Decision(chosen, self._version(chosen), confidence, elapsed, route, best, reason, compared, second)

    async def decide_async(self, requested: Any, text: str, routed: Any = None) -> Decision:
        """decide(), with the second opinion's forward pass (milliseconds of torch) in a worker thread when it
        fires, so the event loop goes on serving other requests meanwhile. `routed`: the classifier's route of
        `text`, when the caller already has it."""
        if requested != AUTO or self.routing is None or self.likelihood is None or not text.strip():
            return self.decide(requested, text, routed=routed)
        started = time.perf_counter()
        routed = routed or self.routing.route([text])[0]
        names = self._second_opinion_names(routed.specialist, routed.confidence, routed.none)
        nll = await asyncio.to_thread(self.likelihood.timed_nll, text, names) if names else None
        return self.decide(requested, text, routed=routed, nll=nll, started=started)

    def _second_opinion_names(self, best: str | None, confidence: float, none: float) -> list[str] | None:
        """The models the second opinion scores, when it fires: the classifier unsure of its specialist and not
        placing the text in no domain (`none`), the router holding the serving models' weights, a specialist among
        them; None otherwise."""
        serve_config = self.config.serve
        if (best is None or confidence >= serve_config.second_opinion_below or none >= serve_config.none_threshold
                or self.likelihood is None or not self.likelihood.ready):
            return None
        names = [m for m in self.entries if m in self.likelihood.models]
        return names if any(m != self.generalist for m in names) else None

    def _second_opinion(self, text: str, best: str | None, confidence: float, none: float,
                        nll: tuple | None = None) -> dict | None:
        """The likelihood decision (serve/likelihood.py) when the classifier is unsure and the router holds the
        serving models; None otherwise. `nll`: the scores already computed (decide_async)."""
        serve_config = self.config.serve
        names = self._second_opinion_names(best, confidence, none)
        if names is None:
            return None
        nll, ms = nll if nll is not None else self.likelihood.timed_nll(text, names)
        decision = decide(nll, self.generalist, serve_config.likelihood_margin)
        return {"chosen": decision.chosen, "best": decision.best, "gain": decision.gain,
                "margin": serve_config.likelihood_margin, "nll": dict(sorted(nll.items(), key=lambda kv: kv[1])),
                "ms": ms, "reason": decision.reason}

    def compare_with_fallback(self, specialist: str) -> dict | None:
        """The serving versions' validation perplexity on `specialist`'s domains (geometric mean over
        them) against the generalist's; None when either is unknown or the check is off."""
        if not self.config.serve.quality_aware or specialist == self.generalist:
            return None
        mine, fallback = self.entries.get(specialist) or {}, self.entries.get(self.generalist) or {}
        domains = self.config.specialist(specialist).domains
        ours, theirs = mine.get("quality") or {}, fallback.get("quality") or {}
        if not all(d in ours and d in theirs for d in domains):
            return None

        def mean(values: list[float]) -> float:
            return math.exp(sum(math.log(v) for v in values) / len(values))

        specialist_ppl, fallback_ppl = mean([ours[d] for d in domains]), mean([theirs[d] for d in domains])
        return {"version": mine.get("version"), "specialist_val_ppl": specialist_ppl,
                "fallback_version": fallback.get("version"), "fallback_val_ppl": fallback_ppl,
                "beats_fallback": specialist_ppl < fallback_ppl}

    def explain(self, text: str, decision: Decision | None = None, routed: Any = None) -> dict:
        """`decision` for `text` with what it was made of: the classifier's scores, threshold and settings.
        `routed`: the classifier's route the decision used (else the text is classified again)."""
        if routed is None and self.routing is not None and text.strip():
            routed = self.routing.route([text])[0]
        decision = decision or self.decide(AUTO, text, routed=routed)
        scores = routed.scores if routed is not None else {}
        return {**asdict(decision), "threshold": self.config.serve.confidence_threshold,
                "none_threshold": self.config.serve.none_threshold,
                "second_opinion_below": self.config.serve.second_opinion_below if self.likelihood else None,
                "quality_aware": self.config.serve.quality_aware,
                "scores": dict(sorted(scores.items(), key=lambda kv: -kv[1])),
                # the routing model's two views before they were mixed into `scores` (None: n-grams alone)
                "views": getattr(routed, "views", None)}

    # ----------------------------------------------------------------- generation

    async def _request(self, kind: str, body: Any):
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        validate_body(kind, body)  # OpenAI's fields and bounds, with clear messages (serve/validation.py)
        body = dict(body)
        try:
            request = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as error:
            raise from_validation(error) from None
        except Exception as error:  # vLLM's own checks raise VLLMValidationError, not a ValidationError
            client = _client_error(error)
            if client is None:
                raise
            raise client from None
        decision = await self.decide_async(body.get("model"), prompt_text(kind, body))
        record_decision(decision)
        self.status_view.decided(decision)
        check_max_tokens(body, decision.specialist, self._max_model_len(decision.specialist))
        default = self.config.serve.default_max_tokens
        if default and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            # at most half the context, so a default never pushes a fitting prompt over the limit
            request = request.model_copy(update={"max_tokens": min(default, self._max_model_len(decision.specialist) // 2)})
        return request.model_copy(update={"model": decision.specialist}), decision

    async def _start(self, kind: str, request, decision: Decision):
        """Send to the serving version; returns (first item, rest of the stream, release callback).

        Nothing has reached the client yet here (a stream's first item is awaited before the response starts),
        so a request is retried where that cannot be told apart from never sending it: once on the new version when
        a swap moved the pointer, and again and again (backing off, within `serve.request_timeout_s`) when the engine
        replica that had it died. Serve restarts that replica and queues the retries until one is up."""
        model = decision.specialist
        timeout_s = self.config.serve.request_timeout_s
        deadline = time.monotonic() + timeout_s
        moved, died = False, 0
        while True:
            entry = self.entries.get(model)
            if entry is None:
                raise unavailable(f"'{model}' has no serving version yet", self.config.serve.retry_after_s)
            app_name, decision.version = entry["app"], entry["version"]
            self.inflight[app_name] = self.inflight.get(app_name, 0) + 1  # counted before any await

            def release(app_name=app_name):
                self.inflight[app_name] -= 1

            handle = self._handle(app_name, model)
            stream = getattr(handle, "chat" if kind == "chat" else "completions").remote(request)
            try:
                first = await asyncio.wait_for(stream.__anext__(), max(deadline - time.monotonic(), 0.01))
            except asyncio.TimeoutError:
                release()
                stream.cancel()
                raise unavailable(f"'{model}' did not answer within {timeout_s:.0f} s",
                                  self.config.serve.retry_after_s, code="timeout") from None
            except _unavailable_errors() as error:
                release()
                if not moved and self.entries.get(model, {}).get("app") != app_name:
                    moved = True
                    continue  # a swap moved the pointer while this request was on its way: retry on the new one
                if isinstance(error, ray.exceptions.RayActorError) and time.monotonic() < deadline - 1:
                    died += 1  # its replica died with it: Serve starts another, and queues this until it is up
                    log.warning("%s: a replica died with a request (%s: %s); retry %d", app_name,
                                type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "", died)
                    await asyncio.sleep(min(0.05 * 2 ** died, 1.0))
                    continue
                log.warning("%s unavailable: %s", app_name, error)
                raise unavailable(f"'{model}' has no healthy replica right now", self.config.serve.retry_after_s) \
                    from None
            except BaseException as error:
                release()
                client = _client_error(error) if isinstance(error, Exception) else None
                if client is not None:
                    raise client from None
                raise
            items = first if isinstance(first, list) else [first]
            if items and type(items[0]).__name__ == "ErrorResponse":
                release()
                raise _engine_error(items[0], model, self._max_model_len(model), kind)
            produced_by = engine_version(items[0] if items else None)
            if produced_by is not None:  # the replica says which weights answered (in-place swaps, serve/engine.py)
                decision.version = produced_by
            return first, stream, release

    async def _begin(self, kind: str, body: Any, stream: bool):
        """Validate, route and start one request (streamed or not), counted in the metrics either way;
        returns (first item, rest of the stream, release callback, decision)."""
        decision = None
        try:
            request, decision = await self._request(kind, body)
            request = request.model_copy(update={"stream": stream})
            first, rest, release = await self._start(kind, request, decision)
        except Exception as error:
            _count(decision, error)
            raise
        _count(decision)
        return first, rest, release, decision

    async def generate(self, kind: str, body: Any) -> tuple[dict, Decision]:
        first, _, release, decision = await self._begin(kind, body, stream=False)
        release()
        result = first.model_dump(mode="json")
        result.pop("senmon_version", None)
        result["senmon"] = asdict(decision)
        return result, decision

    async def generate_stream(self, kind: str, body: Any) -> tuple[AsyncIterator[str], Decision]:
        """SSE text chunks; the first event carries the `senmon` field."""
        first, stream, release, decision = await self._begin(kind, body, stream=True)
        meta = asdict(decision)

        def tag(packet: str) -> str:
            head, sep, rest = packet.partition("\n\n")
            if head.startswith("data: {"):
                event = json.loads(head[len("data: "):])
                event.pop("senmon_version", None)
                event["senmon"] = meta
                return "data: " + json.dumps(event, ensure_ascii=False) + sep + rest
            return packet

        def text(item) -> str:
            if isinstance(item, list):
                return "".join(text(i) for i in item)
            if isinstance(item, str):
                return item
            if type(item).__name__ == "ErrorResponse":
                error = _engine_error(item, decision.specialist, self._max_model_len(decision.specialist), kind)
                record_error(error.status, error.code)
                return "data: " + json.dumps(error.body()) + "\n\n"
            return f"data: {item.model_dump_json()}\n\n"

        async def events() -> AsyncIterator[str]:
            done = False
            try:
                packet = tag(text(first))
                done = "data: [DONE]" in packet
                yield packet
                async for item in stream:
                    packet = text(item)
                    done = done or "data: [DONE]" in packet
                    yield packet
            except _unavailable_errors():
                error = unavailable(f"'{decision.specialist}' went away mid-stream", self.config.serve.retry_after_s)
                record_error(error.status, error.code)
                yield "data: " + json.dumps(error.body()) + "\n\n"
            finally:
                release()
            if not done:
                yield "data: [DONE]\n\n"

        return events(), decision

    # ----------------------------------------------------------------- Python handle API (no HTTP, no keys)

    async def chat(self, body: dict) -> dict:
        return (await self.generate("chat", body))[0]

    async def completions(self, body: dict) -> dict:
        return (await self.generate("completions", body))[0]

    async def _stream_dicts(self, kind: str, body: dict):
        events, _ = await self.generate_stream(kind, body)
        async for packet in events:
            for line in packet.split("\n"):
                if line.startswith("data: {"):
                    yield json.loads(line[len("data: "):])

    async def chat_stream(self, body: dict):
        async for chunk in self._stream_dicts("chat", body):
            yield chunk

    async def completions_stream(self, body: dict):
        async for chunk in self._stream_dicts("completions", body):
            yield chunk

    async def route(self, text: str) -> dict:
        """The `auto` decision for `text`, explained (`POST /v1/route`); the classifier runs once."""
        routed = self.routing.route([text])[0] if self.routing is not None and text.strip() else None
        return self.explain(text, await self.decide_async(AUTO, text, routed), routed)

    async def list_models(self) -> list[dict]:
        def card(model: str, kind: str) -> dict:
            entry = self.entries.get(model)
            return {"id": model, "object": "model", "created": 0, "owned_by": "senmon", "kind": kind,
                    "version": entry["version"] if entry else None, "serving": entry is not None,
                    "max_model_len": self._max_model_len(model) if model != AUTO else None}

        return ([card(AUTO, "router")] + [card(s.name, "specialist") for s in self.config.specialists]
                + [card(self.generalist, "generalist")])

    # ----------------------------------------------------------------- HTTP

    async def _json(self, request: Request) -> Any:
        """The body as JSON: 413 over `http.max_request_bytes` (before reading it when Content-Length says so),
        400 for invalid JSON or nesting deeper than `http.max_json_depth` (checked before parsing)."""
        http = self.config.http
        raw = await read_limited(request.headers.get("content-length"), request.stream(), http.max_request_bytes)
        return parse_json(raw, http.max_json_depth)

    def _check_api(self, request: Request) -> None:
        """Every /v1 route: 401 without a valid key, then 429 over the key's `http.rate_limit` (per key; per
        client host when the API is open). Buckets are this replica's own (serve/ratelimit.py)."""
        token = self.keys.check_api(request.headers.get("authorization"))
        limiter = getattr(self, "limiter", None)
        if limiter is None:
            return
        wait = limiter.check(client_key(token, request.client.host if request.client else None))
        if wait is not None:
            raise rate_limited(f"rate limit exceeded: {limiter.requests_per_minute} requests per minute per caller "
                               f"(burst {limiter.burst}); retry after {wait} s", wait)

    async def _http_generate(self, kind: str, request: Request):
        self._check_api(request)
        body = await self._json(request)
        if isinstance(body, dict) and body.get("stream"):
            events, decision = await self.generate_stream(kind, body)
            return StreamingResponse(events, media_type="text/event-stream", headers=decision.headers())
        result, decision = await self.generate(kind, body)
        return JSONResponse(result, headers=decision.headers())

    @app.post("/v1/chat/completions", openapi_extra=body_doc("chat"),
              responses={**_STREAMED, **responses(400, 401, 404, 413, 429, 503)})
    async def http_chat(self, request: Request):
        return await self._http_generate("chat", request)

    @app.post("/v1/completions", openapi_extra=body_doc("completions"),
              responses={**_STREAMED, **responses(400, 401, 404, 413, 429, 503)})
    async def http_completions(self, request: Request):
        return await self._http_generate("completions", request)

    @app.get("/v1/models", responses=responses(401, 429))
    async def http_models(self, request: Request):
        self._check_api(request)
        return {"object": "list", "data": await self.list_models()}

    @app.get("/v1/models/{model}", responses=responses(401, 404, 429))
    async def http_model(self, model: str, request: Request):
        self._check_api(request)
        for card in await self.list_models():
            if card["id"] == model:
                return card
        raise ApiError(404, f"the model '{model}' does not exist", param="model", code="model_not_found")

    @app.post("/v1/route", openapi_extra=body_doc("route"), responses=responses(400, 401, 413, 429))
    async def http_route(self, request: Request):
        self._check_api(request)
        body = await self._json(request)
        validate_body("route", body)
        return await self.route(prompt_text("chat" if "messages" in body else "completions", body))

    @app.get("/health")
    async def http_health(self):
        return {"status": "ok", "serving": {m: e["version"] for m, e in self.entries.items()}}

    @app.get("/status", **PAGE_ROUTE)
    async def http_status_page(self):
        return page_response()  # the shell holds no data, so it needs no key; its script fetches /status/data

    @app.get("/status/data", **DATA_ROUTE)
    async def http_status_data(self, request: Request):
        self._check_api(request)
        return await self.status_view.data_response(self.registry)

    # ----------------------------------------------------------------- admin

    async def _admin(self, request: Request, action: str) -> dict:
        from senmon.actors.registry import RegistryError
        from senmon.serve.swap import SwapError, run_swap_task, sync_task

        self.keys.check_admin(request.headers.get("authorization"))
        body = await self._json(request)
        body = body if isinstance(body, dict) else {}
        wait = body.get("wait", True)
        if not isinstance(wait, bool):
            raise ApiError(400, "'wait' must be true or false", param="wait", code="invalid_value")
        if action == "reload":
            ref = sync_task.remote(self.config.model_dump(mode="json"), self.registry, self.table)
            if not wait:
                return await self._follow_later(ref, {"action": "reload"}, after=self.table.bump_routing)
            results = await ref
            self.status_view.swapped("reload", results)
            await self.table.bump_routing.remote()
            return {"action": "reload", "swaps": results}
        model = body.get("specialist") or body.get("model")
        if model not in self.models:
            raise ApiError(404 if isinstance(model, str) else 400, f"'specialist' must be one of {', '.join(self.models)}",
                           param="specialist", code="model_not_found")
        version = body.get("version")
        if version is not None and not isinstance(version, int):
            raise ApiError(400, "'version' must be an integer", param="version", code="invalid_value")
        before = await self.registry.current.remote(model)
        try:
            if action == "promote":
                if version is None:
                    raise ApiError(400, "'version' is required", param="version", code="missing_version")
                record = await self.registry.promote.remote(model, version, self.config.training.promotion_margin,
                                                            force=bool(body.get("force")))
                if record["status"] != "serving":
                    raise ApiError(409, f"{model} v{version} was not promoted: {record['reason']}", param="version",
                                   code="gate_refused")
            else:
                record = await self.registry.rollback.remote(model, version)
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, RegistryError):
                raise ApiError(409, str(cause.args[0] if cause.args else cause), code="registry_refused") from None
            raise
        ref = run_swap_task.remote(self.config.model_dump(mode="json"), model, record, self.table, self.registry,
                                   before["version"] if before else None)
        if not wait:
            return await self._follow_later(ref, {"action": action, "record": record})
        try:
            swap = await ref
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, SwapError):
                self.status_view.swapped(action, None, record, "refused", str(cause.args[0]))
                raise ApiError(409, str(cause.args[0]), code="swap_refused") from None
            raise
        self.status_view.swapped(action, swap, record)
        return {"action": action, "record": record, "swap": swap}

    async def _follow_later(self, ref, answer: dict, after=None) -> JSONResponse:
        """`"wait": false`: answer 202 at once with a swap id; the outcome lands in the serving table,
        where any router replica can read it (GET /admin/swaps/{id})."""
        swap_id = uuid.uuid4().hex[:12]
        state = {"id": swap_id, "status": "running", "started_at": time.time(), **answer}
        await self.table.record_swap.remote(swap_id, state)

        async def follow():
            from senmon.serve.swap import SwapError

            try:
                result, status, error = await ref, "done", None
                if after is not None:
                    await after.remote()
            except ray.exceptions.RayTaskError as failure:
                cause = getattr(failure, "cause", None)
                result, status = None, "refused" if isinstance(cause, SwapError) else "failed"
                error = str(cause.args[0]) if isinstance(cause, SwapError) else f"{type(cause).__name__}: {cause}"
            except Exception as failure:
                result, status, error = None, "failed", f"{type(failure).__name__}: {failure}"
            self.status_view.swapped(answer["action"], result, answer.get("record"), status, error)
            await self.table.record_swap.remote(swap_id, {**state, "status": status, "result": result, "error": error,
                                                          "ended_at": time.time()})

        self.followers = [t for t in getattr(self, "followers", []) if not t.done()]
        self.followers.append(asyncio.get_running_loop().create_task(follow()))
        return JSONResponse({**state, "follow": f"/admin/swaps/{swap_id}"}, status_code=202)

    @app.get("/admin/swaps/{swap_id}", responses=responses(401, 403, 404))
    async def http_swap(self, swap_id: str, request: Request):
        self.keys.check_admin(request.headers.get("authorization"))
        state = await self.table.swap_state.remote(swap_id)
        if state is None:
            raise ApiError(404, f"no swap with id '{swap_id}'", param="swap_id", code="not_found")
        return state

    @app.post("/admin/promote", responses={**_FOLLOW, **responses(400, 401, 403, 404, 409, 413)})
    async def http_promote(self, request: Request):
        return await self._admin(request, "promote")

    @app.post("/admin/rollback", responses={**_FOLLOW, **responses(400, 401, 403, 404, 409, 413)})
    async def http_rollback(self, request: Request):
        return await self._admin(request, "rollback")

    @app.post("/admin/reload", responses={**_FOLLOW, **responses(400, 401, 403, 413)})
    async def http_reload(self, request: Request):
        return await self._admin(request, "reload")

    def __del__(self):
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.cancel()
        table = getattr(self, "table", None)
        if table is not None:
            try:
                table.leave.remote(self.replica)
            except Exception:
                pass
