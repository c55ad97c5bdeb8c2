"""/api/v1: the online-only REST API (accounts, payments, reports).

Importing the feature modules registers their operations on :data:`api.v1.api`.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from sync_server.authn import PUBLIC, declare_access

from . import auditlog, auth, biometric, conflicts, staff, users  # noqa: F401  (register operations)
from .openapi import docs_page, openapi_json
from .v1 import api

declare_access(PUBLIC, openapi_json, docs_page)


def routes() -> list[BaseRoute]:
    """The routes of /api/v1 (to mount under ``/api/v1``)."""
    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs_page, methods=["GET"]),
        *api.routes(),
    ]
