"""OpenAI-style errors: every failure leaves the router as `{"error": {message, type, param, code}}`.

`ApiError` is raised anywhere in the request path; the handlers installed by `install` turn it,
FastAPI's validation errors and anything unexpected into that JSON body with the right status.
No response ever carries a traceback: unexpected exceptions are logged on the server and the
client gets a one-line message.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from senmon.metrics import record_error

log = logging.getLogger("senmon.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "server_error")
        self.headers = headers or {}

    def __reduce__(self):  # keyword-only fields survive pickling (errors cross Ray handles)
        return (_rebuild, (self.status, self.message, self.param, self.code, self.type, self.headers))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        record_error(self.status, self.code)  # every error the HTTP API answers goes through here
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every failure's body: `{"error": {message, type, param, code}}`."""

    error: ErrorDetail


def responses(*statuses: int) -> dict:
    """OpenAPI `responses` for a route: the error body under each status it can answer."""
    said = {400: "invalid request: the message and `param` name the field", 401: "missing or wrong API key",
            403: "not allowed with this key", 404: "unknown model", 409: "refused by the registry or the swap",
            413: "request body over `http.max_request_bytes`", 429: "over this key's `http.rate_limit`; "
            "`Retry-After` says when to try again", 503: "no serving version or healthy replica; "
            "`Retry-After` says when to try again"}
    return {status: {"model": ErrorBody, "description": said.get(status, "error")} for status in statuses}


def _rebuild(status, message, param, code, type, headers) -> ApiError:
    return ApiError(status, message, param=param, code=code, type=type, headers=headers)


def unavailable(message: str, retry_after: int, code: str = "model_unavailable") -> ApiError:
    return ApiError(503, message, code=code, headers={"Retry-After": str(retry_after)})


def rate_limited(message: str, retry_after: int) -> ApiError:
    return ApiError(429, message, code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}
_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool", "function"}


def _branch(part) -> bool:
    """A union member pydantic adds to an error's path (`str`, `list[str]`, `function-after[...]`)."""
    return isinstance(part, str) and (any(c in part for c in "[]()") or part in _TYPE_NAMES)


def _clean_loc(loc) -> tuple[list[str], int | None]:
    """Field names only, and where the first union member sat (None: no union on the path)."""
    out, branch_at = [], None
    for part in loc:
        if part == "body" and not out:  # FastAPI's prefix
            continue
        if _branch(part):
            branch_at = len(out) if branch_at is None else branch_at
            continue
        # a discriminated union adds the tag: messages.0.user.content -> messages.0.content
        if part in _ROLE_TAGS and len(out) >= 2 and out[-2] == "messages" and out[-1].isdigit():
            continue
        out.append(str(part))
    return out, branch_at


def _is_type_mismatch(item: dict) -> bool:
    kind = item.get("type", "")
    return kind.endswith("_type") or kind.endswith("_parsing")


def from_validation(error: ValidationError | RequestValidationError, status: int = 400) -> ApiError:
    """The first bad field, named by its path (`messages.0.role`), as the error's `param`.

    A value that fits no member of a union (`prompt`: a string or a list) gives one error per
    member; those are merged into one message, preferring what the member of the right type
    said ("at most 4 items") over "should be a valid string".
    """
    items = error.errors()
    first = items[0] if items else {"loc": (), "msg": "invalid request"}
    loc, branch_at = _clean_loc(first.get("loc", ()))
    chosen = same = [(loc, first)]
    if branch_at is not None:
        stem = loc[:branch_at]
        same = [(c[0], item) for item in items if (c := _clean_loc(item.get("loc", ())))[1] == branch_at
                and c[0][:branch_at] == stem]
        chosen = [pair for pair in same if not _is_type_mismatch(pair[1])] or same
        loc = stem
        for i in range(branch_at, min(len(path) for path, _ in chosen)):  # deeper where every message agrees
            if len({path[i] for path, _ in chosen}) != 1:
                break
            loc = chosen[0][0][:i + 1]
    if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        loc = loc + [str((first.get("ctx") or {}).get("discriminator", "")).strip("'\"") or "role"]
    messages = list(dict.fromkeys(item.get("msg", "invalid value") for _, item in chosen))
    counted = len(items) - (len(same) if branch_at is not None else 1)
    param = ".".join(loc) or None
    where = f"'{param}': " if param else ""
    more = f" (and {counted} more problem{'s' if counted > 1 else ''})" if counted > 0 else ""
    return ApiError(status, f"{where}{' or '.join(messages[:3])}{more}", param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError):
        return from_validation(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException):
        message = error.detail if isinstance(error.detail, str) else "request failed"
        if error.status_code == 404 and message == "Not Found":
            message = "no such endpoint"
        if error.status_code == 405:
            message = "method not allowed on this endpoint"
        return ApiError(error.status_code, message, headers=dict(error.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception):
        log.exception("unexpected error in the router")
        return ApiError(500, f"internal error ({type(error).__name__}); the server log has the details",
                        type="server_error", code="internal_error").response()
