"""Liveness and readiness probes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from .db import ping
from .resources import Resources


def healthz(request: Request) -> JSONResponse:
    """The process is alive and serving (no dependency is checked)."""
    return JSONResponse({"status": "ok"})


def readyz(request: Request) -> JSONResponse:
    """Ready when the database and, if configured, Redis answer; 503 with the reason otherwise."""
    resources: Resources = request.app.state.resources
    checks: dict[str, str] = {}
    failures: dict[str, list[str]] = {}
    try:
        ping(resources.engine)
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready
        checks["database"] = "unavailable"
        failures["database"] = [type(exc).__name__ + ": " + str(exc).splitlines()[0][:200]]
    if resources.redis is not None:
        try:
            resources.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = "unavailable"
            failures["redis"] = [type(exc).__name__ + ": " + str(exc)[:200]]
    if failures:
        return JSONResponse(
            {"code": "not_ready", "message": "A dependency is unavailable.", "details": failures},
            status_code=503,
        )
    return JSONResponse({"status": "ready", "checks": checks})
