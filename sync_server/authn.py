"""Authenticating requests: a bearer access token, checked against the user's current state.

The token's signature, issuer, audience and expiry are checked by :class:`TokenService`; the user
row is then read so that a deactivated user, or a user whose ``token_epoch`` moved on (role change,
password change, deactivation), is refused at once rather than when the token expires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import CompoundSelect, bindparam, null, select, union_all
from sqlalchemy.engine import Connection
from starlette.requests import Request

from domain.roles import Role, parse_role

from .account_tables import refresh_tokens
from .errors import ApiError
from .tables import branches, user_branches, users
from .tokens import AccessClaims, InvalidToken

if TYPE_CHECKING:
    from .resources import Resources


@dataclass(frozen=True)
class Identity:
    """The authenticated user behind a request, as the database says now."""

    user_id: str
    role: Role
    branch_ids: frozenset[str]
    display_name: str
    device_id: str | None
    token_id: str


def _unauthenticated(message: str) -> ApiError:
    return ApiError(401, "unauthenticated", message, headers={"WWW-Authenticate": "Bearer"})


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthenticated("A bearer access token is required.")
    return token.strip()


# One statement, one round trip: the user, whether this token's session was signed out, and
# the user's branches (one row per branch; a user without branches gives one row with NULL).
_SIGNED_OUT = (
    select(refresh_tokens.c.id)
    .where(refresh_tokens.c.access_jti == bindparam("jti"))
    .where(refresh_tokens.c.revoked_at.is_not(None))
    .exists()
)
#: A user's own columns, and the user with one row per branch (a NULL one without branches).
_USER = (users.c.id, users.c.role, users.c.display_name, users.c.is_active, users.c.token_epoch)
_WITH_BRANCHES = users.outerjoin(user_branches, user_branches.c.user_id == users.c.id)
_IDENTITY = (
    select(*_USER, _SIGNED_OUT.label("signed_out"), user_branches.c.branch_id)
    .select_from(_WITH_BRANCHES)
    .where(users.c.id == bindparam("user_id"))
)
_ALL_BRANCHES = select(branches.c.id)
#: Several users at once (:func:`load_identities`) and, in the same round trip, which of the
#: requests' token sessions ended: rows with a ``jti`` name a signed-out session, the others
#: are a user's (one per branch).
_IDENTITIES: CompoundSelect[Any] = union_all(
    select(*_USER, user_branches.c.branch_id, null().label("jti"))
    .select_from(_WITH_BRANCHES)
    .where(users.c.id.in_(bindparam("user_ids", expanding=True))),
    select(*(null() for _ in range(len(_USER) + 1)), refresh_tokens.c.access_jti).where(
        refresh_tokens.c.access_jti.in_(bindparam("jtis", expanding=True)),
        refresh_tokens.c.revoked_at.is_not(None),
    ),
)


def load_identity(conn: Connection, claims: AccessClaims) -> Identity:
    """Resolve verified ``claims`` to the user's current identity, or raise a 401."""
    rows = conn.execute(_IDENTITY, {"user_id": claims.user_id, "jti": claims.token_id}).all()
    return _identity(conn, claims, rows, signed_out=bool(rows and rows[0].signed_out))


def load_identities(conn: Connection, claims: Sequence[AccessClaims]) -> list[Identity | ApiError]:
    """:func:`load_identity` for several requests at once (a group of pushes), in one
    statement whatever their number: each request's identity, or the 401 refusing it."""
    if len(claims) == 1:
        try:
            return [load_identity(conn, claims[0])]
        except ApiError as exc:
            return [exc]
    rows_of: dict[str, list[Any]] = {}
    signed_out: set[str] = set()
    params = {
        "user_ids": sorted({c.user_id for c in claims}),
        "jtis": sorted({c.token_id for c in claims}),
    }
    for row in conn.execute(_IDENTITIES, params):
        if row.jti is not None:
            signed_out.add(row.jti)
        else:
            rows_of.setdefault(row.id, []).append(row)
    found: list[Identity | ApiError] = []
    for c in claims:
        try:
            found.append(
                _identity(conn, c, rows_of.get(c.user_id, []), signed_out=c.token_id in signed_out)
            )
        except ApiError as exc:
            found.append(exc)
    return found


def _identity(
    conn: Connection, claims: AccessClaims, rows: Sequence[Any], *, signed_out: bool
) -> Identity:
    if not rows or not rows[0].is_active:
        raise _unauthenticated("This account is not active.")
    row = rows[0]
    if row.token_epoch != claims.epoch:
        raise _unauthenticated("This token has been revoked; sign in again.")
    # An access token issued with a refresh token dies with its session (logout, refresh-token
    # reuse), not 15 minutes later. Tokens minted outside a session (CLI) have no row.
    if signed_out:
        raise _unauthenticated("This session has been signed out; sign in again.")
    role = parse_role(row.role)
    if role is Role.ADMIN:
        branch_ids = frozenset(conn.execute(_ALL_BRANCHES).scalars())
    else:
        branch_ids = frozenset(r.branch_id for r in rows if r.branch_id is not None)
    return Identity(
        user_id=row.id,
        role=role,
        branch_ids=branch_ids,
        display_name=row.display_name,
        device_id=claims.device_id,
        token_id=claims.token_id,
    )


def verified_claims(request: Request) -> AccessClaims:
    """The claims of ``request``'s bearer token, signature and expiry checked (no database:
    :func:`load_identity` then says whether the user may still use them)."""
    resources: Resources = request.app.state.resources
    try:
        return resources.tokens.verify(bearer_token(request))
    except InvalidToken as exc:
        raise _unauthenticated("The access token is invalid or expired.") from exc


def authenticate(request: Request) -> Identity:
    """The identity behind ``request``'s bearer token (blocking: call from a thread)."""
    resources: Resources = request.app.state.resources
    claims = verified_claims(request)
    # Closed with its read transaction open: the connection's close() rolls it back, once.
    with resources.engine.connect() as conn:
        return load_identity(conn, claims)


# Every route declares what it needs: a permission slug (seeded by the migrations, see
# ``role_permissions``), ``AUTHENTICATED`` (any signed-in, active user; the endpoint authenticates
# itself) or ``PUBLIC``. The declaration is an attribute on the endpoint function, so it works for
# any starlette ``Route``; tests walk the app's routes and fail on an undeclared one.
PUBLIC = "public"
AUTHENTICATED = "authenticated"
_ACCESS_ATTRIBUTE = "__galley_access__"


def declare_access(access: str, *endpoints: Callable[..., Any]) -> None:
    """Record that ``endpoints`` need ``access`` (a permission slug, AUTHENTICATED or PUBLIC)."""
    for endpoint in endpoints:
        setattr(endpoint, _ACCESS_ATTRIBUTE, access)


def declared_access(endpoint: Callable[..., Any]) -> str | None:
    """What ``endpoint`` declared with :func:`declare_access`, or None when it forgot."""
    value = getattr(endpoint, _ACCESS_ATTRIBUTE, None)
    return value if isinstance(value, str) else None
