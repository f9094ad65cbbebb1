"""What the router accepts, checked before anything reaches an engine.

Three gates, in the order a request meets them:

1. **Size.** `read_limited` refuses a body larger than `http.max_request_bytes` with 413: from
   its `Content-Length` before a byte is read, or, for a chunked body without one, as soon as
   the bytes read pass the limit. A huge body is never read whole.
2. **Nesting.** `check_depth` refuses JSON nested deeper than `http.max_json_depth` with 400
   before `json.loads` sees it (Python's parser and pydantic recurse, so 100,000 brackets would
   otherwise end in a RecursionError). `parse_json` checks the depth, then parses: invalid JSON,
   bad UTF-8 and a too-deep document are all 400.
3. **Fields.** `CompletionRequest`, `ChatCompletionRequest` and `RouteRequest` are pydantic
   models of the OpenAI request bodies with OpenAI's bounds: `prompt` a non-empty string, list
   of strings or token ids (never null); `messages` a non-empty list whose `role` is one of
   OpenAI's (system, developer, user, assistant, tool, function) and whose `content` is present
   where OpenAI requires it; `n` 1..8; `max_tokens` >= 1 (and at most the model's context,
   checked once the model is known); `stop` at most 4 strings; `logprobs` 0..5 on completions,
   `top_logprobs` 0..20 on chat (and only with `logprobs: true`); `temperature` 0..2; `top_p`
   in (0, 1]; penalties -2..2. Fields they do not name (vLLM's `top_k`, `ignore_eos`, ...) pass
   through to vLLM's own request models, which check them next. The router declares these
   models as the request bodies in `/openapi.json`, so `/docs` shows them.

A failure is an `ApiError` (serve/errors.py): 400 (413 for size), OpenAI's error body, the
message and `param` naming the field (`messages.0.role`).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, AsyncIterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

from senmon.serve.errors import ApiError, from_validation

MAX_N = 8  # completions per prompt: the engine has no hard limit; 8 keeps one request from filling a small engine
MAX_STOP = 4  # OpenAI: up to 4 stop sequences
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's completions API: logprobs 0..5
MAX_TOP_LOGPROBS = 20  # OpenAI's chat API: top_logprobs 0..20 (also vLLM's default max_logprobs)
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


# --------------------------------------------------------------------------- size and nesting


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the limit of {limit} bytes (http.max_request_bytes)",
                    code="request_too_large")


def declared_length(header: str | None, limit: int) -> int | None:
    """The body's size from its Content-Length header; 413 at once when it is over the limit."""
    if header is None:
        return None
    try:
        length = int(header)
        if length < 0:
            raise ValueError(header)
    except ValueError:
        raise ApiError(400, f"invalid Content-Length header: {header!r}", code="invalid_request") from None
    if length > limit:
        raise too_large(limit)
    return length


async def read_limited(content_length: str | None, chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """The body, read chunk by chunk, never more than `limit` bytes (413 when it would be)."""
    declared_length(content_length, limit)
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


# a JSON string (escapes included) or one bracket; strings are skipped whole, so brackets inside them do not count
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects deeper than `limit`, found without recursion."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # cannot nest deeper than it has brackets
        return False
    depth = 0
    for match in _TOKENS.finditer(raw):
        first = match.group()[0]
        if first in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif first in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def check_depth(raw: bytes, limit: int) -> None:
    if json_depth_exceeds(raw, limit):
        raise ApiError(400, f"the request body nests JSON deeper than {limit} levels (http.max_json_depth)",
                       code="json_too_deep")


def parse_json(raw: bytes, max_depth: int) -> Any:
    """The body as JSON (an empty body is null); 400 for invalid JSON or nesting deeper than `max_depth`."""
    check_depth(raw, max_depth)
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:  # a limit above what the parser can take
        raise ApiError(400, "the request body nests JSON too deeply", code="json_too_deep") from None


# --------------------------------------------------------------------------- the request bodies


class _Open(BaseModel):
    """Fields not named here pass through (OpenAI's newer fields, vLLM's extensions)."""

    model_config = ConfigDict(extra="allow")


def _not_null(value: Any, what: str) -> Any:
    if value is None:
        raise PydanticCustomError("null_value", "null is not allowed here; send {what}", {"what": what})
    return value


class ContentPart(_Open):
    """A part of a message's content: `{"type": "text", "text": ...}`, `{"type": "image_url", ...}`, ..."""

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_has_text(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise PydanticCustomError("missing", "a 'text' content part needs 'text'")
        return self


class TextPart(_Open):
    type: Literal["text"]
    text: str


TextContent = Union[str, Annotated[list[TextPart], Field(min_length=1)]]
AnyContent = Union[str, Annotated[list[ContentPart], Field(min_length=1)]]


class SystemMessage(_Open):
    role: Literal["system"]
    content: TextContent
    name: str | None = None


class DeveloperMessage(_Open):
    role: Literal["developer"]
    content: TextContent
    name: str | None = None


class UserMessage(_Open):
    role: Literal["user"]
    content: AnyContent
    name: str | None = None


class AssistantMessage(_Open):
    """`content` may be left out only when the message carries `tool_calls` or `function_call`."""

    role: Literal["assistant"]
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None
    content: AnyContent | None = Field(None, validate_default=True)
    refusal: str | None = None
    name: str | None = None

    @field_validator("content", mode="after")
    @classmethod
    def _content_unless_tool_calls(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and not info.data.get("tool_calls") and not info.data.get("function_call"):
            raise PydanticCustomError("missing", "Field required (an assistant message without tool_calls needs content)")
        return value


class ToolMessage(_Open):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str


class FunctionMessage(_Open):
    """Deprecated by OpenAI in favour of `tool`, still accepted there."""

    role: Literal["function"]
    name: str
    content: str | None


Message = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage, FunctionMessage],
                    Field(discriminator="role")]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Union[str, Annotated[list[str], Field(min_length=1)], TokenIds, Annotated[list[TokenIds], Field(min_length=1)]]


class _Generation(_Open):
    model: str = Field(min_length=1, description="'auto' (routed by content), a specialist's name or the generalist's")
    n: int | None = Field(None, ge=1, le=MAX_N, description=f"completions per prompt, 1..{MAX_N}")
    max_tokens: int | None = Field(None, ge=1, description="at least 1 and at most the model's context")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"up to {MAX_STOP} sequences where generation stops")
    seed: int | None = None
    stream: bool | None = Field(False, description="server-sent events; the first event carries `senmon`")
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class CompletionRequest(_Generation):
    """`POST /v1/completions`."""

    prompt: Prompt = Field(description="a string, a non-empty list of strings, or token ids")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_not_null(cls, value: Any) -> Any:
        return _not_null(value, "a string, a list of strings, or token ids")


class ChatCompletionRequest(_Generation):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[Message], Field(min_length=1)] = Field(
        description="at least one message; role: " + ", ".join(ROLES))
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs: true")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_not_null(cls, value: Any) -> Any:
        return _not_null(value, "a list of messages")

    @field_validator("top_logprobs", mode="after")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise PydanticCustomError("needs_logprobs", "top_logprobs needs logprobs: true")
        return value


class RouteRequest(_Open):
    """`POST /v1/route`: `prompt` or `messages`; scores per specialist, no generation."""

    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None


BODIES = {"completions": CompletionRequest, "chat": ChatCompletionRequest, "route": RouteRequest}


def validate_body(kind: str, body: Any) -> BaseModel:
    """The body checked against its model; an `ApiError` (400, naming the field) when it fails."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    if kind == "route" and not (isinstance(body.get("prompt"), str) or isinstance(body.get("messages"), list)):
        raise ApiError(400, "send 'prompt' (a string) or 'messages' (a list)", param="prompt", code="invalid_value")
    try:
        return BODIES[kind].model_validate(body)
    except ValidationError as error:
        raise from_validation(error) from None


def check_max_tokens(body: dict, model: str, context: int) -> None:
    """`max_tokens` (or `max_completion_tokens`) may not exceed the chosen model's context."""
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if isinstance(value, int) and value > context:
            raise ApiError(400, f"'{field}' is {value}, more than {model}'s context of {context} tokens",
                           param=field, code="invalid_value")


def request_schemas() -> dict[str, dict]:
    """JSON schemas of the request bodies and what they use, for `components.schemas` of the OpenAPI document."""
    _, top = models_json_schema([(model, "validation") for model in BODIES.values()],
                                ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})


def body_doc(kind: str) -> dict:
    """`openapi_extra` of a route: its request body is the model for `kind` (the route reads the raw body)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{BODIES[kind].__name__}"}}}}}
