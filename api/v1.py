"""The registry of /api/v1 operations; the feature modules register on it when imported."""

from __future__ import annotations

from .contract import Api

api = Api()
