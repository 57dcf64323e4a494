"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the
HTTP status OpenAI's SDKs map to their exception types (docs/http.md, Errors)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from cosine.client import (BadRequest, Cancelled, CosineError, Overloaded, Refused, RequestTimeout, TooLong,
                           Unavailable)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          429: "rate_limit_error", 499: "cancelled", 500: "internal_error", 501: "not_implemented", 503: "service_unavailable",
          504: "timeout_error"}


class ApiError(Exception):
    """An HTTP error answer; ``param`` names the request field at fault, if one is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"), "param": self.param,
                          "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def from_serve(e: CosineError) -> ApiError:
    """cosine-serve's error (cosine.client's types) -> the HTTP answer."""
    if isinstance(e, TooLong):
        return ApiError(400, e.message, "prompt", "context_length_exceeded")
    if isinstance(e, BadRequest):
        return ApiError(400, e.message, None, e.code)
    if isinstance(e, Overloaded):
        return ApiError(429, f"cosine-serve is overloaded: {e.message}", None, e.code)
    if isinstance(e, RequestTimeout):
        return ApiError(504, e.message, None, "timeout")
    if isinstance(e, (Unavailable, Refused)):
        return ApiError(503, f"cosine-serve or a worker is unavailable: {e.message}", None, e.code)
    if isinstance(e, Cancelled):
        return ApiError(499, e.message, None, e.code)
    return ApiError(500, f"cosine-serve failed the request: {e.message}", None, e.code)
