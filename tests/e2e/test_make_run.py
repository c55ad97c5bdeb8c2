"""The two-command setup and the CI gate, as a newcomer and CI run them.

``make run`` itself (a fresh virtualenv and a pip install) is too slow for the suite; its recipe is
read with ``make -n``. ``.ci/run`` is run for real, pointed at closed ports with a harmless start
command, to prove that it fails instead of skipping when a service cannot be reached.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ci(**overrides: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "SERVICE_WAIT": "1",
        "MYSQL_START_CMD": "true",  # "starting" changes nothing: the port stays closed
        "REDIS_START_CMD": "true",
        **overrides,
    }
    return subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ci_fails_when_mariadb_is_unreachable_and_cannot_be_started() -> None:
    result = _ci(MYSQL_PORT="1")
    assert result.returncode == 1
    assert "FATAL: MariaDB (127.0.0.1:1) is unreachable and could not be started" in result.stderr


@pytest.mark.integration
def test_ci_fails_when_redis_is_unreachable_and_cannot_be_started() -> None:
    from sqlalchemy.engine import make_url

    from tests.conftest import TEST_MYSQL_URL

    if not TEST_MYSQL_URL:
        pytest.skip("integration tier not configured: set TEST_MYSQL_URL (MariaDB must be up)")
    mysql = make_url(TEST_MYSQL_URL)
    result = _ci(
        MYSQL_HOST=mysql.host or "127.0.0.1", MYSQL_PORT=str(mysql.port or 3306), REDIS_PORT="1"
    )
    assert result.returncode == 1
    assert "FATAL: Redis (127.0.0.1:1) is unreachable and could not be started" in result.stderr


def test_ci_reports_a_start_command_that_fails() -> None:
    result = _ci(MYSQL_PORT="1", MYSQL_START_CMD="exit 3")
    assert result.returncode == 1
    assert "the start command failed" in result.stderr


def test_make_run_creates_the_venv_installs_migrates_seeds_then_serves(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-n", "-B", "run", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    steps = result.stdout
    order = [
        f"python3 -m venv {venv}",
        f"{venv}/bin/python -m pip install --quiet -e '.[dev]'",
        f"{venv}/bin/galley migrate",
        f"{venv}/bin/galley seed-demo",
        f"{venv}/bin/galley serve --host 127.0.0.1 --port 8000",
    ]
    positions = [steps.find(step) for step in order]
    assert -1 not in positions, steps
    assert positions == sorted(positions), steps


def test_make_test_runs_the_linters_the_type_checker_and_pytest() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    steps = subprocess.run(
        ["make", "-n", "-B", "test", "VENV=/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for tool in ("ruff format --check", "ruff check", "lint-imports", "mypy", "pytest"):
        assert tool in steps, tool


def test_the_readme_quick_start_is_make_run_and_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```sh\n(.*?)```", readme, re.S)
    assert block is not None
    assert block.group(1).split("\n")[:2] == ["make run", "make test"]
