"""The error object every 4xx/5xx carries: ``{"code", "message", "details"}``.

``details`` maps a field (or ``"_"`` for the request as a whole) to a list of messages, as the
/api/v1 contract requires; the sync endpoint uses the same shape, encoded as MessagePack when the
client asked for it.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger("galley.errors")

_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    426: "upgrade_required",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An error with a status, a stable machine-readable code and field-level details."""

    def __init__(
        self,
        status: int,
        code: str | None = None,
        message: str | None = None,
        details: dict[str, list[str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code or _DEFAULT_CODES.get(status, "error")
        self.message = message or self.code.replace("_", " ")
        self.details = details or {}
        self.headers = headers or {}
        super().__init__(f"{status} {self.code}: {self.message}")

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


def error_response(request: Request, error: ApiError) -> Response:
    """Render ``error`` in the representation the client accepts (MessagePack or JSON)."""
    accept = request.headers.get("accept", "")
    content_type = request.headers.get("content-type", "")
    if "application/msgpack" in accept or (
        "application/msgpack" in content_type and "application/json" not in accept
    ):
        import msgspec

        return Response(
            msgspec.msgpack.encode(error.body()),
            status_code=error.status,
            media_type="application/msgpack",
            headers=error.headers,
        )
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request, exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    message = exc.detail if isinstance(exc.detail, str) else None
    return error_response(request, ApiError(exc.status_code, message=message, headers=headers))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    # Never a traceback to the client; the log has it.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        request, ApiError(500, "internal_error", "The server failed to handle this request.")
    )
