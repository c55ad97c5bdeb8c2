"""/api/v1: the online-only REST API (accounts, payments, reports).

Importing the feature modules registers their operations on :data:`api.v1.api`.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from . import auditlog, auth, biometric, staff, users  # noqa: F401  (register operations)
from .v1 import api


def routes() -> list[BaseRoute]:
    """The routes of /api/v1 (to mount under ``/api/v1``)."""
    return list(api.routes())
