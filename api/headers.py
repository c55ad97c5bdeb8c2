"""Security headers on every response (pure ASGI middleware, so streaming is untouched).

``nosniff`` and frame denial everywhere; a locked-down CSP on everything but the docs page (which
sets its own); HSTS only when the request arrived over TLS (directly, or through a trusted proxy
that says so), since browsers ignore it over plain HTTP; no ``Server`` header.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HSTS = "max-age=63072000; includeSubDomains"
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'"


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def _trust_proxy(scope: Scope) -> bool:
        resources = getattr(getattr(scope.get("app"), "state", None), "resources", None)
        return bool(resources is not None and resources.settings.trust_proxy_headers)

    def _is_tls(self, scope: Scope) -> bool:
        if scope.get("scheme") in ("https", "wss"):
            return True
        if self._trust_proxy(scope):
            for name, value in scope.get("headers", []):
                if name == b"x-forwarded-proto":
                    return bool(value.decode("latin-1").split(",")[0].strip().lower() == "https")
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tls = self._is_tls(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "no-referrer"
                if "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = DEFAULT_CSP
                if tls:
                    headers["Strict-Transport-Security"] = HSTS
                if "server" in headers:
                    del headers["server"]
            await send(message)

        await self.app(scope, receive, send_with_headers)
