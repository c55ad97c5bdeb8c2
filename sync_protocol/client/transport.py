"""HTTP transport of the reference client: encoding, authentication, error mapping.

It speaks to ``{base_url}/sync/v1`` through any :class:`httpx.Client` (the tests pass
Starlette's ``TestClient``, which is one). A 401 makes it ask the app for a fresh token once and
resend; every other failure becomes one of :mod:`sync_protocol.client.errors`, so the sync loop
decides about retries in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import msgspec

from .. import messages as m
from ..codec import JSON, MSGPACK, decode, encode
from .errors import (
    DeviceNotRegistered,
    NetworkError,
    RequestRefused,
    ResetRequired,
    ServerError,
    Unauthorized,
    UpgradeRequired,
)

T = TypeVar("T")

#: Returns the current access token; called with ``refresh=True`` after a 401, when the app
#: must obtain a new one (refresh token, or sign-in).
TokenProvider = Callable[[bool], str]


class Transport:
    """Sends protocol messages and returns decoded answers (or raises a client error)."""

    def __init__(
        self,
        http: httpx.Client,
        base_url: str,
        token_provider: TokenProvider,
        *,
        media_type: str = MSGPACK,
        timeout: float | None = None,
    ) -> None:
        if media_type not in (MSGPACK, JSON):
            raise ValueError(f"unsupported media type {media_type!r}")
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.token_provider = token_provider
        self.media_type = media_type
        self.timeout = timeout
        self._token: str | None = None

    # --- the three endpoints -----------------------------------------------------------------

    def register(self, message: m.RegisterDevice) -> m.DeviceInfo:
        return self._call("/sync/v1/devices", message, m.DeviceInfo)

    def push(self, message: m.PushRequest) -> m.PushResponse:
        return self._call("/sync/v1/push", message, m.PushResponse)

    def pull(self, message: m.PullRequest) -> m.PullResponse:
        return self._call("/sync/v1/pull", message, m.PullResponse)

    # --- mechanics -----------------------------------------------------------------------------

    def _token_for(self, refresh: bool) -> str:
        if refresh or self._token is None:
            self._token = self.token_provider(refresh)
        return self._token

    def _call(self, path: str, message: Any, answer: type[T]) -> T:
        body = encode(message, self.media_type)
        refreshed = False
        while True:
            response = self._send(path, body, self._token_for(refresh=refreshed))
            if response.status_code == 401 and not refreshed:
                # The token expired or was revoked: one fresh token, one more try.
                refreshed = True
                continue
            return self._answer(response, answer)

    def _send(self, path: str, body: bytes, token: str) -> httpx.Response:
        headers = {
            "Content-Type": self.media_type,
            "Accept": self.media_type,
            "Authorization": f"Bearer {token}",
        }
        try:
            if self.timeout is None:  # the client's own configuration decides
                response = self.http.post(self.base_url + path, content=body, headers=headers)
            else:
                response = self.http.post(
                    self.base_url + path, content=body, headers=headers, timeout=self.timeout
                )
            response.read()
        except httpx.TransportError as exc:
            raise NetworkError(f"{path}: {type(exc).__name__}: {exc}") from exc
        return response

    def _error_body(self, response: httpx.Response) -> m.ErrorBody | None:
        media = response.headers.get("content-type", "").split(";")[0].strip()
        try:
            return decode(response.content, m.ErrorBody, MSGPACK if media == MSGPACK else JSON)
        except (msgspec.DecodeError, ValueError):
            return None

    def _answer(self, response: httpx.Response, answer: type[T]) -> T:
        status = response.status_code
        if status == 200:
            media = response.headers.get("content-type", "").split(";")[0].strip()
            try:
                return decode(response.content, answer, MSGPACK if media == MSGPACK else JSON)
            except (msgspec.DecodeError, ValueError) as exc:
                # A truncated or garbled body is a transport failure: the request is safe to
                # repeat (push replays return the stored outcome).
                raise NetworkError(f"undecodable {answer.__name__}: {exc}") from exc
        body = self._error_body(response)
        if status >= 500 or status == 429:
            raise ServerError(status, body, _retry_after(response))
        if body is None:
            body = m.ErrorBody(f"http_{status}", response.text[:200] or f"HTTP {status}")
        if status == 401:
            raise Unauthorized(status, body)
        if status == 426:
            raise UpgradeRequired(status, body)
        if status == 409 and body.code == "reset_required":
            raise ResetRequired(status, body)
        if status == 404 and body.code == "device_not_registered":
            raise DeviceNotRegistered(status, body)
        raise RequestRefused(status, body)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
