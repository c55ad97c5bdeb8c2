"""Liveness, readiness and the error shape, over HTTP."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from sync_server.app import create_app
from sync_server.db import create_db_engine
from sync_server.resources import build_resources
from tests.conftest import make_settings


def test_healthz_answers_while_the_process_lives(client: Any) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_200_when_the_database_answers(client: Any, db: Engine) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"]["database"] == "ok"


def test_readyz_is_503_with_the_reason_when_the_database_is_down() -> None:
    engine = create_db_engine("mysql+pymysql://nobody@127.0.0.1:1/none")
    res = build_resources(make_settings("mysql+pymysql://nobody@127.0.0.1:1/none"), engine=engine)
    with TestClient(create_app(resources=res)) as client:
        response = client.get("/readyz")
    res.close()
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == "not_ready"
    assert "database" in body["details"]


def test_readyz_reports_redis_when_configured_and_down(db: Engine) -> None:
    settings = make_settings("sqlite://", redis_url="redis://127.0.0.1:1/0")
    res = build_resources(settings, engine=db)
    with TestClient(create_app(resources=res)) as client:
        response = client.get("/readyz")
    res.release()
    assert response.status_code == 503
    assert "redis" in response.json()["details"]


def test_unknown_route_gets_the_json_error_object(client: Any) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"code": "not_found", "message": "Not Found", "details": {}}


def test_wrong_method_gets_the_json_error_object(client: Any) -> None:
    response = client.delete("/healthz")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"


def test_a_serving_process_collects_cyclic_garbage_less_often(tmp_path: Any) -> None:
    import gc

    before = gc.get_threshold()
    settings = make_settings(f"sqlite:///{tmp_path / 'gc.db'}")
    try:
        with TestClient(create_app(settings=settings)):
            assert gc.get_threshold() == (50_000, 20, 20)
            assert gc.get_freeze_count() > 0
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
