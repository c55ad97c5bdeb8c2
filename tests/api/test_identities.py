"""Who a group of pushes is from: ``load_identities`` answers, for many requests in one
statement, exactly what ``load_identity`` answers for each alone."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine

from sync_server.authn import load_identities, load_identity
from sync_server.errors import ApiError
from sync_server.resources import Resources
from sync_server.tables import users
from tests.factories import Factory


def _alone(db: Engine, claims: Any) -> Any:
    with db.connect() as conn:
        try:
            return load_identity(conn, claims)
        except ApiError as exc:
            return exc
        finally:
            conn.rollback()


def _key(found: Any) -> Any:
    if isinstance(found, ApiError):
        return ("refused", found.status, found.message)
    return ("ok", found.user_id, found.role, found.branch_ids, found.token_id)


def test_many_requests_are_identified_as_each_alone(
    db: Engine, resources: Resources, factory: Factory, sign_in: Any
) -> None:
    branches = [factory.branch(), factory.branch()]
    active = factory.user("manager", branches=branches)
    other = factory.user("staff", branches=branches[:1])
    gone = factory.user("staff")
    stale = factory.user("staff")
    admin = factory.user("admin")
    kept, ended = sign_in(active), sign_in(active)
    ended.post("/api/v1/auth/logout", json={"refresh_token": ended.refresh_token})
    tokens = [
        kept.access_token,
        ended.access_token,
        factory.token(other),
        factory.token(gone),
        factory.token(stale),
        factory.token(admin),
        kept.access_token,  # the same token twice in one group
    ]
    with db.begin() as conn:
        conn.execute(update(users).where(users.c.id == gone.id).values(is_active=False))
        conn.execute(update(users).where(users.c.id == stale.id).values(token_epoch=7))
    claims = [resources.tokens.verify(t) for t in tokens]

    with db.connect() as conn:
        together = load_identities(conn, claims)
        conn.rollback()

    assert [_key(f) for f in together] == [_key(_alone(db, c)) for c in claims]
    assert [k[0] for k in map(_key, together)] == [
        "ok",
        "refused",
        "ok",
        "refused",
        "refused",
        "ok",
        "ok",
    ]
