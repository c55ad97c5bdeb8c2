"""Deployment files are well-formed (they cannot be run on CI machines, so read them)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_docker_compose_defines_the_four_services_with_healthchecks() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"mysql", "redis", "web", "worker"}
    assert services["mysql"]["image"].startswith("mysql:8")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("mysql", "redis", "web"):
        assert "healthcheck" in services[name], name
    for name in ("web", "worker"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("mysql+pymysql://")
        assert env["REDIS_URL"].startswith("redis://")
    assert services["web"]["depends_on"]["mysql"]["condition"] == "service_healthy"


def test_dockerfile_installs_every_package_of_the_distribution() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in (
        "sync_protocol",
        "sync_server",
        "domain",
        "conflict",
        "api",
        "jobs",
        "migrations",
    ):
        assert f"COPY {package} {package}" in dockerfile
