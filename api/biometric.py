"""``/auth/biometric``: sign-in with a device-bound key unlocked by the phone's biometrics.

The flow the blueprint fixes:

1. a manager enables biometric login for a staff member (``PATCH /staff/{id}``);
2. during a *password*-authenticated session, the staff member's phone fetches a challenge and
   registers its public key with a signature of that challenge (proof of possession);
3. later, the phone fetches a challenge and signs it to sign in. Challenges are 32 random bytes,
   single use, and live 5 minutes; the signed message is the challenge's ASCII text.

A biometric sign-in is refused, asking for the password, when the user's last password sign-in is
more than 30 days old: biometrics unlock a key, they do not prove the person still knows the
password. Failures count towards the same temporary lockout as passwords and are audited.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection

from sync_server import audit
from sync_server.account_tables import biometric_challenges, biometric_credentials
from sync_server.db import run_in_transaction
from sync_server.errors import ApiError
from sync_server.tables import devices, users

from . import devicekeys, schemas, sessions
from .auth import check_lockout, count_failure, open_session
from .contract import Context, Reply, not_found
from .users import session_reply
from .v1 import api

CHALLENGE_LIFETIME = timedelta(minutes=5)
PASSWORD_MAX_AGE = timedelta(days=30)
#: Outstanding challenges a signature is checked against (the newest ones of the device).
MAX_OUTSTANDING = 5


def _signature(text: str, field: str = "signature") -> bytes:
    try:
        return devicekeys.b64decode(text)
    except ValueError:
        raise ApiError(
            422, "validation_error", "Invalid signature.", {field: ["not base64"]}
        ) from None


def _consume_challenge(
    conn: Connection, ctx: Context, device_id: str, key: devicekeys.DevicePublicKey, sig: bytes
) -> bool:
    """Mark used, and return True for, the outstanding challenge ``sig`` signs (if any)."""
    rows = conn.execute(
        select(biometric_challenges.c.id, biometric_challenges.c.challenge)
        .where(
            biometric_challenges.c.device_id == device_id,
            biometric_challenges.c.used_at.is_(None),
            biometric_challenges.c.expires_at > ctx.now,
        )
        .order_by(biometric_challenges.c.created_at.desc())
        .limit(MAX_OUTSTANDING)
        .with_for_update()
    ).all()
    for row in rows:
        if devicekeys.verify(key, sig, row.challenge.encode("ascii")):
            used = conn.execute(
                update(biometric_challenges)
                .where(
                    biometric_challenges.c.id == row.id, biometric_challenges.c.used_at.is_(None)
                )
                .values(used_at=ctx.now)
            ).rowcount
            return bool(used == 1)
    return False


def _credential_out(row: Any) -> schemas.BiometricCredential:
    return schemas.BiometricCredential(
        id=row.id,
        device_id=row.device_id,
        algorithm=row.algorithm,
        created_at=schemas.utc(row.created_at),
        last_used_at=schemas.utc_or_none(row.last_used_at),
    )


@api.operation(
    "POST",
    "/auth/biometric/challenge",
    access="public",
    summary="A single-use challenge (5 minutes) for a device to sign",
    tag="biometric",
    body=schemas.ChallengeRequest,
    response=schemas.Challenge,
    status=201,
    transactional=True,
    errors=(429,),
)
def issue_challenge(ctx: Context, body: schemas.ChallengeRequest, conn: Connection) -> Reply:
    device_id = body.device_id.lower()
    policy = ctx.limiter.policy
    ctx.limiter.enforce(policy.biometric_per_ip, "biometric-ip", ctx.ip)
    ctx.limiter.enforce(policy.biometric_per_device, "biometric-device", device_id)
    conn.execute(
        delete(biometric_challenges).where(
            biometric_challenges.c.device_id == device_id,
            biometric_challenges.c.expires_at <= ctx.now,
        )
    )
    challenge = secrets.token_urlsafe(32)
    expires = ctx.now + CHALLENGE_LIFETIME
    conn.execute(
        insert(biometric_challenges).values(
            id=str(uuid.uuid4()),
            device_id=device_id,
            challenge=challenge,
            created_at=ctx.now,
            expires_at=expires,
        )
    )
    return Reply(
        schemas.Challenge(challenge=challenge, expires_at=schemas.utc(expires)), status=201
    )


@api.operation(
    "POST",
    "/auth/biometric/register",
    access="biometric.enroll",
    summary="Enrol this device's key (needs manager approval, a password session, proof)",
    tag="biometric",
    body=schemas.BiometricRegistration,
    response=schemas.BiometricCredential,
    status=201,
    transactional=True,
    idempotent=True,
    errors=(403, 409),
)
def register(
    ctx: Context, body: schemas.BiometricRegistration, conn: Connection
) -> schemas.BiometricCredential:
    user_id = ctx.user.user_id
    device_id = body.device_id.lower()
    session = sessions.session_of(conn, ctx.user.token_id)
    if session is None or session.method != sessions.PASSWORD:
        raise ApiError(
            403,
            "password_session_required",
            "Sign in with your password on this device to enrol biometric login.",
        )
    enabled = conn.execute(select(users.c.biometric_enabled).where(users.c.id == user_id)).scalar()
    if not enabled:
        raise ApiError(
            403, "biometric_not_enabled", "A manager must enable biometric login for you first."
        )
    owner = conn.execute(select(devices.c.user_id).where(devices.c.id == device_id)).scalar()
    enrolled_by = conn.execute(
        select(biometric_credentials.c.user_id).where(
            biometric_credentials.c.device_id == device_id,
            biometric_credentials.c.revoked_at.is_(None),
        )
    ).scalars()
    if any(other != user_id for other in [owner, *enrolled_by] if other is not None):
        raise ApiError(
            409,
            "device_owned_by_other_user",
            "This device id belongs to another user.",
            {"device_id": ["belongs to another user"]},
        )
    try:
        algorithm, key = devicekeys.parse_public_key(body.public_key)
    except devicekeys.UnsupportedKey as exc:
        raise ApiError(
            422, "validation_error", "Unsupported public key.", {"public_key": [str(exc)]}
        ) from None
    if not _consume_challenge(conn, ctx, device_id, key, _signature(body.signature)):
        raise ApiError(
            422,
            "validation_error",
            "The signature does not prove possession of the key.",
            {"signature": ["does not sign an outstanding challenge of this device"]},
        )
    conn.execute(
        update(biometric_credentials)
        .where(
            biometric_credentials.c.device_id == device_id,
            biometric_credentials.c.revoked_at.is_(None),
        )
        .values(revoked_at=ctx.now)
    )
    credential_id = str(uuid.uuid4())
    conn.execute(
        insert(biometric_credentials).values(
            id=credential_id,
            user_id=user_id,
            device_id=device_id,
            algorithm=algorithm,
            public_key_enc=ctx.resources.cipher.encrypt(devicekeys.to_pem(key)),
            created_at=ctx.now,
        )
    )
    audit.record(
        conn,
        audit.BIOMETRIC_ENROLLED,
        actor=user_id,
        subject=user_id,
        ip=ctx.ip,
        details={"credential_id": credential_id, "device_id": device_id, "algorithm": algorithm},
        now=ctx.now,
    )
    row = conn.execute(
        select(biometric_credentials).where(biometric_credentials.c.id == credential_id)
    ).one()
    return _credential_out(row)


@api.operation(
    "POST",
    "/auth/biometric/login",
    access="public",
    summary="Sign in with a signature of an outstanding challenge by the device's enrolled key",
    tag="biometric",
    body=schemas.BiometricLogin,
    response=schemas.Session,
    errors=(401, 429),
)
def biometric_login(ctx: Context, body: schemas.BiometricLogin) -> Reply:
    device_id = body.device_id.lower()
    policy = ctx.limiter.policy
    ctx.limiter.enforce(policy.biometric_per_ip, "biometric-ip", ctx.ip)
    ctx.limiter.enforce(policy.biometric_per_device, "biometric-device", device_id)
    signature = _signature(body.challenge_response, "challenge_response")
    refused = ApiError(401, "invalid_credentials", "Biometric sign-in failed.")
    engine = ctx.resources.engine
    with engine.connect() as conn:
        credential = conn.execute(
            select(biometric_credentials).where(
                biometric_credentials.c.device_id == device_id,
                biometric_credentials.c.revoked_at.is_(None),
            )
        ).first()
        conn.rollback()
    if credential is None:
        raise refused
    user_id: str = credential.user_id
    ctx.limiter.enforce(policy.biometric_per_account, "biometric-account", user_id)
    lockout_key = f"biometric:{user_id}"
    check_lockout(ctx, lockout_key, user_id)
    key = devicekeys.parse_public_key(ctx.resources.cipher.decrypt(credential.public_key_enc))[1]

    def work(conn: Connection) -> str | tuple[sessions.Tokens, schemas.User]:
        if not _consume_challenge(conn, ctx, device_id, key, signature):
            return "bad_signature"
        user = conn.execute(
            select(users.c.is_active, users.c.biometric_enabled, users.c.last_password_login_at)
            .where(users.c.id == user_id)
            .with_for_update()
        ).one()
        if not user.is_active or not user.biometric_enabled:
            return "not_allowed"
        last = user.last_password_login_at
        if last is None or last < ctx.now - PASSWORD_MAX_AGE:
            return "password_required"
        conn.execute(
            update(biometric_credentials)
            .where(biometric_credentials.c.id == credential.id)
            .values(last_used_at=ctx.now)
        )
        return open_session(conn, ctx, user_id, method=sessions.BIOMETRIC, device_id=device_id)

    outcome = run_in_transaction(engine, work)
    if outcome == "bad_signature" or outcome == "not_allowed":
        count_failure(ctx, lockout_key, user_id, sessions.BIOMETRIC)
        raise refused
    if outcome == "password_required":
        audit.record_now(
            engine,
            audit.LOGIN_FAILED,
            outcome="refused",
            subject=user_id,
            ip=ctx.ip,
            details={"method": sessions.BIOMETRIC, "reason": "password_required"},
            now=ctx.now,
        )
        raise ApiError(
            401,
            "password_required",
            "Your last password sign-in is more than 30 days old; sign in with your password.",
        )
    assert not isinstance(outcome, str)
    tokens, profile = outcome
    return session_reply(tokens, profile)


@api.operation(
    "GET",
    "/auth/biometric/credentials",
    access="biometric.enroll",
    summary="The caller's enrolled biometric device keys",
    tag="biometric",
    response=list[schemas.BiometricCredential],
)
def list_credentials(ctx: Context, _body: None) -> list[schemas.BiometricCredential]:
    with ctx.resources.engine.connect() as conn:
        rows = conn.execute(
            select(biometric_credentials)
            .where(
                biometric_credentials.c.user_id == ctx.user.user_id,
                biometric_credentials.c.revoked_at.is_(None),
            )
            .order_by(biometric_credentials.c.created_at)
        ).all()
        conn.rollback()
    return [_credential_out(row) for row in rows]


@api.operation(
    "DELETE",
    "/auth/biometric/credentials/{credential_id}",
    access="biometric.enroll",
    summary="Revoke one of the caller's biometric device keys",
    tag="biometric",
    status=204,
    transactional=True,
    errors=(404,),
)
def revoke_credential(ctx: Context, _body: None, conn: Connection) -> Reply:
    row = conn.execute(
        select(biometric_credentials.c.id, biometric_credentials.c.device_id).where(
            biometric_credentials.c.id == ctx.path["credential_id"],
            biometric_credentials.c.user_id == ctx.user.user_id,
            biometric_credentials.c.revoked_at.is_(None),
        )
    ).first()
    if row is None:
        raise not_found("credential")
    conn.execute(
        update(biometric_credentials)
        .where(biometric_credentials.c.id == row.id)
        .values(revoked_at=ctx.now)
    )
    audit.record(
        conn,
        audit.BIOMETRIC_REVOKED,
        actor=ctx.user.user_id,
        subject=ctx.user.user_id,
        ip=ctx.ip,
        details={"credential_id": row.id, "device_id": row.device_id},
        now=ctx.now,
    )
    return Reply(status=204)
