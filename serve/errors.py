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
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

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
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _rebuild(status, message, param, code, type, headers) -> ApiError:
    return ApiError(status, message, param=param, code=code, type=type, headers=headers)


def unavailable(message: str, retry_after: int, code: str = "model_unavailable") -> ApiError:
    return ApiError(503, message, code=code, headers={"Retry-After": str(retry_after)})


def from_validation(error: ValidationError | RequestValidationError, status: int = 400) -> ApiError:
    """The first bad field, named by its path (`messages.0.role`), as the error's `param`."""
    items = error.errors()
    first = items[0] if items else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # pydantic unions add the model name to the path (e.g. "function-after[...]"); keep field names only
    loc = [p for p in loc if not any(c in p for c in "[]()")]
    param = ".".join(loc) or None
    where = f"'{param}': " if param else ""
    more = f" (and {len(items) - 1} more problem{'s' if len(items) > 2 else ''})" if len(items) > 1 else ""
    return ApiError(status, f"{where}{first.get('msg', 'invalid value')}{more}", param=param, code="invalid_value")


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
