"""The ``galley`` command line."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError, IntegrityError

from .settings import SettingsError, load_settings

if TYPE_CHECKING:
    from .resources import Resources


def _resources() -> Resources:
    from .resources import build_resources

    return build_resources(load_settings())


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = load_settings()
    logging.basicConfig(level=settings.log_level)
    uvicorn.run(
        "sync_server.asgi:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        proxy_headers=settings.trust_proxy_headers,
        server_header=False,
        log_level=settings.log_level.lower(),
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from . import migrate
    from .db import create_db_engine

    settings = load_settings()
    engine = create_db_engine(settings.database_url)
    try:
        migrate.upgrade(engine, args.revision)
    finally:
        engine.dispose()
    print(f"database migrated to {args.revision}")
    return 0


def cmd_seed_demo(args: argparse.Namespace) -> int:
    from .db import run_in_transaction
    from .seed import DEMO_PASSWORD, seed_demo

    res = _resources()
    try:
        logins = run_in_transaction(res.engine, lambda conn: seed_demo(conn, res.cipher))
    finally:
        res.close()
    print(f"Demo organisation ready. Logins (password: {DEMO_PASSWORD}):")
    for login in logins:
        print(f"  {login.role:<8} {login.branch:<8} {login.email}")
    return 0


def cmd_branches_create(args: argparse.Namespace) -> int:
    from .db import run_in_transaction
    from .directory import DirectoryError, create_branch

    res = _resources()
    try:
        branch = run_in_transaction(
            res.engine, lambda conn: create_branch(conn, args.code, args.name)
        )
    except DirectoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except IntegrityError:
        print(f"error: branch {args.code.strip()} already exists", file=sys.stderr)
        return 2
    finally:
        res.close()
    print(f"branch {branch.code} created ({branch.id})")
    return 0


def cmd_users_create(args: argparse.Namespace) -> int:
    from .db import run_in_transaction
    from .directory import DirectoryError, create_user

    password = args.password or getpass.getpass("Password: ")
    if len(password) < 8:
        print("error: the password must have at least 8 characters", file=sys.stderr)
        return 2
    res = _resources()
    try:
        user_id = run_in_transaction(
            res.engine,
            lambda conn: create_user(
                conn,
                email=args.email,
                password=password,
                role=args.role,
                branch_codes=args.branch or [],
                display_name=args.name,
                cipher=res.cipher,
            ),
        )
    except (DirectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except IntegrityError:
        # Another process created the same email between our check and our insert.
        print(f"error: a user with email {args.email.strip().lower()} exists", file=sys.stderr)
        return 2
    finally:
        res.close()
    print(f"user {args.email.strip().lower()} created ({user_id})")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Mint an access token for a user (operators and tests; the app signs in via /api/v1)."""
    from sqlalchemy import select

    from .tables import user_branches, users

    res = _resources()
    try:
        with res.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.email == args.email.lower())).first()
            if row is None:
                print(f"error: no user {args.email}", file=sys.stderr)
                return 2
            branch_list = list(
                conn.execute(
                    select(user_branches.c.branch_id).where(user_branches.c.user_id == row.id)
                ).scalars()
            )
        print(
            res.tokens.mint(
                user_id=row.id, role=row.role, branch_ids=branch_list, epoch=row.token_epoch
            )
        )
    finally:
        res.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from jobs.consumer import run_consumer

    return run_consumer(load_settings(), workers=args.workers)


def cmd_compact(args: argparse.Namespace) -> int:
    from .compaction import compact_tombstones

    if args.days is not None and args.days < 0:
        print("error: --days must be 0 or more", file=sys.stderr)
        return 2
    res = _resources()
    try:
        days = args.days if args.days is not None else res.settings.tombstone_retention_days
        purged = compact_tombstones(res.engine, retention_days=days)
    finally:
        res.close()
    print(f"purged {purged} tombstones")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="galley", description="Galley offline-first sync server")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="serve the HTTP API (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "migrate", help="upgrade the database schema (alembic) to the latest revision"
    )
    p.add_argument("--revision", default="head")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "seed-demo", help="create the demo organisation (idempotent) and print its logins"
    )
    p.set_defaults(func=cmd_seed_demo)

    branches = sub.add_parser("branches", help="manage branches: create").add_subparsers(
        dest="branches_command", required=True, metavar="ACTION"
    )
    p = branches.add_parser("create", help="create a branch")
    p.add_argument("code")
    p.add_argument("--name", required=True)
    p.set_defaults(func=cmd_branches_create)

    users = sub.add_parser("users", help="manage users: create").add_subparsers(
        dest="users_command", required=True, metavar="ACTION"
    )
    p = users.add_parser("create", help="create a user (e.g. the first manager)")
    p.add_argument("--email", required=True)
    p.add_argument("--password", help="prompted for when omitted")
    p.add_argument("--role", required=True, choices=["staff", "manager", "admin"])
    p.add_argument("--branch", action="append", help="branch code (repeatable)")
    p.add_argument("--name", help="display name")
    p.set_defaults(func=cmd_users_create)

    p = sub.add_parser("token", help="print an access token for a user (operators, tests)")
    p.add_argument("--email", required=True)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("worker", help="run the background job consumer (huey)")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("compact", help="purge tombstones older than the retention period")
    p.add_argument("--days", type=int)
    p.set_defaults(func=cmd_compact)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except DBAPIError as exc:
        # Unreachable server, wrong credentials, or a schema that was never migrated: say so in
        # one line instead of a driver traceback.
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)
        print(
            f"database error: {reason}\n"
            "(check DATABASE_URL, and run `galley migrate` on a new database)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
