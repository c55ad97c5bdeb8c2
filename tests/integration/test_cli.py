"""The ``galley`` command line, the way an operator sets up an empty database.

Commands run in-process through ``sync_server.cli.main`` with the configuration in the environment
(as a shell would set it), against a fresh, unmigrated database: a SQLite file, and a scratch
MariaDB database when ``TEST_MYSQL_URL`` is set. ``galley serve`` runs as a real process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine, make_url

from sync_server.cli import main
from sync_server.db import create_db_engine
from sync_server.passwords import verify_password
from sync_server.settings import load_settings
from sync_server.tables import (
    branches,
    inventory_items,
    menu_items,
    sync_rows,
    sync_scopes,
    user_branches,
    users,
)
from sync_server.tokens import TokenService
from tests.conftest import TEST_SECRET

PASSWORD = "operator-chosen-password"


@dataclass
class Cli:
    """Runs ``galley …`` in-process; returns (exit code, stdout, stderr)."""

    database_url: str
    engine: Engine
    capsys: pytest.CaptureFixture[str]

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse rejects bad arguments this way
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, f"galley {' '.join(argv)} -> {code}: {err}"
        return out

    def count(self, table: object) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(select(func.count()).select_from(table)).scalar_one()  # type: ignore[arg-type]
            conn.rollback()
        return int(value)


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.integration)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a database that exists but has never been migrated."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'galley.db'}"
        return
    worker_url: str = request.getfixturevalue("mysql_url")
    name = f"{make_url(worker_url).database}_cli"
    admin = create_db_engine(worker_url)
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    try:
        yield make_url(worker_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


def _environment(database_url: str) -> dict[str, str]:
    return {
        "GALLEY_ENV": "test",
        "DATABASE_URL": database_url,
        "GALLEY_SECRET_KEY": TEST_SECRET,
    }


@pytest.fixture
def cli(
    empty_database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Cli]:
    # The configuration comes from the environment only: no .env of the checkout, var/ in tmp.
    monkeypatch.chdir(tmp_path)
    for name in ("REDIS_URL", "GALLEY_ENCRYPTION_KEYS", "GALLEY_JWT_PRIVATE_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in _environment(empty_database_url).items():
        monkeypatch.setenv(name, value)
    engine = create_db_engine(empty_database_url)
    yield Cli(empty_database_url, engine, capsys)
    engine.dispose()


@pytest.fixture
def migrated(cli: Cli) -> Cli:
    assert "migrated" in cli.ok("migrate")
    return cli


def _user(cli: Cli, email: str) -> tuple[str, str, str, list[str]]:
    with cli.engine.connect() as conn:
        row = conn.execute(select(users).where(users.c.email == email)).one()
        branch_ids = sorted(
            conn.execute(
                select(user_branches.c.branch_id).where(user_branches.c.user_id == row.id)
            ).scalars()
        )
        conn.rollback()
    return row.id, row.role, row.password_hash, branch_ids


def _branch_id(cli: Cli, code: str) -> str:
    with cli.engine.connect() as conn:
        value = conn.execute(select(branches.c.id).where(branches.c.code == code)).scalar_one()
        conn.rollback()
    return str(value)


# --- setting up an empty database ---------------------------------------------------------------


def test_an_operator_sets_up_an_empty_database_and_the_first_manager_can_sign_in(
    migrated: Cli,
) -> None:
    cli = migrated
    assert "branch CITY created" in cli.ok("branches", "create", "CITY", "--name", "City Centre")
    out = cli.ok(
        "users", "create", "--email", "Boss@Example.com", "--password", PASSWORD,
        "--role", "manager", "--branch", "CITY", "--name", "The Boss",
    )  # fmt: skip
    assert "boss@example.com created" in out

    user_id, role, password_hash, branch_ids = _user(cli, "boss@example.com")
    assert role == "manager"
    assert branch_ids == [_branch_id(cli, "CITY")]
    assert verify_password(password_hash, PASSWORD)
    assert not verify_password(password_hash, PASSWORD + "!")

    token = cli.ok("token", "--email", "boss@example.com").strip()
    claims = TokenService(load_settings(env_file=None)).verify(token)
    assert (claims.user_id, claims.role, claims.branch_ids) == (
        user_id,
        "manager",
        tuple(branch_ids),
    )


def test_migrate_twice_is_harmless(migrated: Cli) -> None:
    assert "migrated" in migrated.ok("migrate")


def test_seed_demo_is_idempotent_and_prints_the_demo_logins(migrated: Cli) -> None:
    cli = migrated
    tables = (branches, users, user_branches, inventory_items, menu_items, sync_rows)

    first = cli.ok("seed-demo")
    counts = {t.name: cli.count(t) for t in tables}
    with cli.engine.connect() as conn:
        versions = dict(conn.execute(select(sync_scopes.c.scope, sync_scopes.c.version)).all())
        conn.rollback()
    second = cli.ok("seed-demo")

    assert counts == {t.name: cli.count(t) for t in tables}, "the second run created nothing"
    with cli.engine.connect() as conn:
        assert versions == dict(
            conn.execute(select(sync_scopes.c.scope, sync_scopes.c.version)).all()
        ), "and published nothing"
        conn.rollback()
    assert counts["branches"] == 2
    assert counts["users"] == 1 + 2 * 4, "an admin, and a manager and 3 staff per branch"
    assert counts["inventory_items"] > 0 and counts["menu_items"] > 0
    assert first == second
    assert "manager.city@demo.galley.test" in first and "galley-demo-password" in first
    _, role, password_hash, _ = _user(cli, "manager.city@demo.galley.test")
    assert role == "manager" and verify_password(password_hash, "galley-demo-password")


# --- bad input: exit code 2, a clear message, nothing created -----------------------------------


def _nothing_but(cli: Cli, *, users_count: int, branches_count: int, rows: int) -> None:
    assert cli.count(users) == users_count
    assert cli.count(branches) == branches_count
    assert cli.count(sync_rows) == rows


def test_a_user_in_an_unknown_branch_is_refused(migrated: Cli) -> None:
    cli = migrated
    cli.ok("branches", "create", "CITY", "--name", "City")
    rows = cli.count(sync_rows)
    code, _, err = cli(
        "users", "create", "--email", "a@example.com", "--password", PASSWORD,
        "--role", "staff", "--branch", "CITY", "--branch", "NOWHERE",
    )  # fmt: skip
    assert code == 2
    assert "no branch with code 'NOWHERE'" in err
    _nothing_but(cli, users_count=0, branches_count=1, rows=rows)


def test_an_unknown_role_is_refused(migrated: Cli) -> None:
    cli = migrated
    cli.ok("branches", "create", "CITY", "--name", "City")
    code, _, err = cli(
        "users", "create", "--email", "a@example.com", "--password", PASSWORD,
        "--role", "owner", "--branch", "CITY",
    )  # fmt: skip
    assert code == 2
    assert "invalid choice: 'owner'" in err and "staff" in err
    assert cli.count(users) == 0


def test_a_duplicate_email_is_refused_whatever_its_case(migrated: Cli) -> None:
    cli = migrated
    cli.ok("branches", "create", "CITY", "--name", "City")
    create = ("users", "create", "--password", PASSWORD, "--role", "staff", "--branch", "CITY")
    cli.ok(*create, "--email", "sam@example.com")
    rows = cli.count(sync_rows)
    code, _, err = cli(*create, "--email", " SAM@example.com ")
    assert code == 2
    assert "a user with email sam@example.com exists" in err
    _nothing_but(cli, users_count=1, branches_count=1, rows=rows)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--email", "not-an-email", "--role", "staff", "--branch", "CITY"), "email is not valid"),
        (("--email", "a@example.com", "--role", "staff"), "at least one branch"),
        (("--email", "a@example.com", "--role", "manager"), "at least one branch"),
    ],
)
def test_an_invalid_user_is_refused(
    migrated: Cli, arguments: tuple[str, ...], message: str
) -> None:
    cli = migrated
    cli.ok("branches", "create", "CITY", "--name", "City")
    rows = cli.count(sync_rows)
    code, _, err = cli("users", "create", "--password", PASSWORD, *arguments)
    assert code == 2
    assert message in err
    _nothing_but(cli, users_count=0, branches_count=1, rows=rows)


def test_a_short_password_is_refused(migrated: Cli) -> None:
    code, _, err = migrated(
        "users", "create", "--email", "a@example.com", "--password", "short", "--role", "admin"
    )
    assert code == 2
    assert "at least 8 characters" in err
    assert migrated.count(users) == 0


def test_a_duplicate_branch_code_is_refused(migrated: Cli) -> None:
    cli = migrated
    cli.ok("branches", "create", "CITY", "--name", "City")
    rows = cli.count(sync_rows)
    code, _, err = cli("branches", "create", "CITY", "--name", "Another city")
    assert code == 2
    assert "branch CITY already exists" in err
    _nothing_but(cli, users_count=0, branches_count=1, rows=rows)


def test_a_token_for_an_unknown_user_is_refused(migrated: Cli) -> None:
    code, out, err = migrated("token", "--email", "ghost@example.com")
    assert code == 2
    assert out == ""
    assert "no user ghost@example.com" in err


def test_an_unmigrated_database_gets_one_line_of_advice_not_a_traceback(cli: Cli) -> None:
    code, _, err = cli("branches", "create", "CITY", "--name", "City")
    assert code == 1
    assert "galley migrate" in err
    assert "Traceback" not in err


def test_production_without_a_secret_is_a_configuration_error(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GALLEY_ENV", "production")
    monkeypatch.delenv("GALLEY_SECRET_KEY")
    code, _, err = cli("migrate")
    assert code == 2
    assert "configuration error: GALLEY_SECRET_KEY must be set" in err


def test_help_lists_every_command_with_a_description(cli: Cli) -> None:
    code, out, _ = cli("--help")
    assert code == 0
    for command in ("serve", "migrate", "seed-demo", "branches", "users", "worker", "token"):
        assert f"    {command}" in out, command
    code, out, _ = cli("users", "--help")
    assert code == 0 and "create" in out


# --- galley serve, after migrate and users create -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _galley() -> list[str]:
    script = Path(sys.executable).parent / "galley"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sync_server.cli"]


def test_galley_serve_answers_the_user_created_from_the_cli(migrated: Cli, tmp_path: Path) -> None:
    cli = migrated
    cli.ok("branches", "create", "CITY", "--name", "City Centre")
    cli.ok(
        "users", "create", "--email", "boss@example.com", "--password", PASSWORD,
        "--role", "manager", "--branch", "CITY",
    )  # fmt: skip
    token = cli.ok("token", "--email", "boss@example.com").strip()
    port = _free_port()
    env = {"PATH": os.environ.get("PATH", ""), **_environment(cli.database_url)}
    server = subprocess.Popen(
        [*_galley(), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.communicate()[0]
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start within 30 s"
                time.sleep(0.2)
        assert ready.status_code == 200, ready.text
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200

        device = str(uuid.uuid4())
        response = httpx.post(
            f"{base}/sync/v1/devices",
            json={
                "protocol": "1.0",
                "device_id": device,
                "platform": "ios",
                "app_version": "1.0.0",
            },
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json()["device_id"] == device
        assert httpx.get(f"{base}/nope", timeout=5).json()["code"] == "not_found"
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert "Traceback" not in output, output
