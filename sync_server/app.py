"""The ASGI application factory.

``create_app()`` builds nothing at import time: the engine, Redis client and token service are
created in the lifespan (or handed in by tests) and disposed of on shutdown.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

import api
from api.headers import SecurityHeaders

from . import errors, sync_http
from .authn import AUTHENTICATED, PUBLIC, declare_access
from .health import healthz, readyz
from .resources import Resources, build_resources
from .settings import Settings, load_settings

log = logging.getLogger("galley.app")


# Every route declares its access (see authn.declare_access; a test walks the routes). The sync
# endpoints authenticate the bearer token themselves and serve any active user.
declare_access(PUBLIC, healthz, readyz)
declare_access(AUTHENTICATED, sync_http.register, sync_http.push_endpoint, sync_http.pull_endpoint)


def _routes() -> list[BaseRoute]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Mount("/sync/v1", routes=sync_http.routes()),
        Mount("/api/v1", routes=api.routes()),
    ]


class _GalleyApp(Starlette):
    def build_middleware_stack(self) -> ASGIApp:
        # Outermost, so that even the bare 500 of ServerErrorMiddleware carries the headers.
        return SecurityHeaders(super().build_middleware_stack())


def _tune_garbage_collector() -> None:
    """A serving process allocates fast and frees nearly everything by reference counting: the
    cyclic collector's default pace (a young-generation pass every 700 net allocations, each
    re-walking everything built at startup) cost ~4 % of a push group's CPU. Startup's objects
    are moved out of its sight for good, and passes come less often (at most a few MB of cyclic
    garbage wait for one)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def create_app(settings: Settings | None = None, resources: Resources | None = None) -> Starlette:
    """Build the Galley ASGI app. ``resources`` (tests) are used as given and not closed."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owned = resources is None
        res = resources or build_resources(settings or load_settings())
        app.state.resources = res
        if owned:
            _tune_garbage_collector()
        try:
            yield
        finally:
            if owned:
                res.close()

    app = _GalleyApp(
        routes=_routes(),
        lifespan=lifespan,
        exception_handlers={
            errors.ApiError: errors.handle_api_error,
            HTTPException: errors.handle_http_exception,
            Exception: errors.handle_unexpected,
        },
    )
    if resources is not None:
        # Available before the lifespan runs, for test clients that skip it.
        app.state.resources = resources
    return app
