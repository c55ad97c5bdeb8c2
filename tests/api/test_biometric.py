"""Biometric sign-in with device-bound keys: enrolment, challenges, sign-in and revocation."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from sqlalchemy import select
from sqlalchemy.engine import Engine

from sync_server.account_tables import audit_log, biometric_credentials
from sync_server.directory import utcnow
from sync_server.resources import Resources
from tests.factories import Factory, User


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class DeviceKey:
    """A phone's key pair, in one of the formats phones produce."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.private: Any = (
            Ed25519PrivateKey.generate()
            if kind == "ed25519"
            else ec.generate_private_key(ec.SECP256R1())
        )

    def public(self) -> str:
        pub = self.private.public_key()
        if self.kind == "p256_raw_point":  # iOS SecKeyCopyExternalRepresentation
            return b64(
                pub.public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                )
            )
        if self.kind == "p256_pem":
            return pub.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
        return b64(
            pub.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def sign(self, challenge: str) -> str:
        message = challenge.encode("ascii")
        if self.kind == "ed25519":
            return b64(self.private.sign(message))
        der = self.private.sign(message, ec.ECDSA(hashes.SHA256()))
        if self.kind == "p256_raw_point":  # raw r || s, as some libraries sign
            r, s = decode_dss_signature(der)
            return b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        return b64(der)


class Phone:
    def __init__(self, client: Any, key: DeviceKey) -> None:
        self.client = client
        self.key = key
        self.device_id = str(uuid.uuid4())

    def challenge(self) -> str:
        response = self.client.post(
            "/api/v1/auth/biometric/challenge", json={"device_id": self.device_id}
        )
        assert response.status_code == 201, response.text
        return str(response.json()["data"]["challenge"])

    def register(self, session: Any) -> Any:
        challenge = self.challenge()
        return session.post(
            "/api/v1/auth/biometric/register",
            json={
                "device_id": self.device_id,
                "public_key": self.key.public(),
                "signature": self.key.sign(challenge),
            },
        )

    def login(self, signature: str | None = None) -> Any:
        return self.client.post(
            "/api/v1/auth/biometric/login",
            json={
                "device_id": self.device_id,
                "challenge_response": signature or self.key.sign(self.challenge()),
            },
        )


@pytest.fixture
def enabled_staff(client: Any, factory: Factory) -> User:
    branch = factory.branch()
    manager = factory.user("manager", [branch])
    member = factory.user("staff", [branch])
    response = client.patch(
        f"/api/v1/staff/{member.id}",
        json={"biometric_enabled": True},
        headers=factory.auth(manager),
    )
    assert response.status_code == 200 and response.json()["data"]["biometric_enabled"]
    return member


@pytest.fixture
def phone(client: Any) -> Callable[[str], Phone]:
    return lambda kind="p256_der": Phone(client, DeviceKey(kind))


@pytest.mark.parametrize("kind", ["p256_der", "p256_pem", "p256_raw_point", "ed25519"])
def test_an_enabled_staff_member_enrols_a_device_and_signs_in_with_it(
    kind: str, client: Any, sign_in: Any, enabled_staff: User, phone: Any, db: Engine
) -> None:
    device = phone(kind)
    enrolled = device.register(sign_in(enabled_staff))
    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.json()["data"]["device_id"] == device.device_id
    response = device.login()
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["user"]["id"] == enabled_staff.id
    me = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {data['access_token']}"})
    assert me.status_code == 200
    with db.connect() as conn:
        events = list(conn.execute(select(audit_log.c.event)).scalars())
    assert "biometric.enabled" in events and "biometric.enrolled" in events


def test_challenges_are_at_least_16_random_bytes_and_unique(phone: Any) -> None:
    device = phone()
    first, second = device.challenge(), device.challenge()
    assert first != second
    assert len(base64.urlsafe_b64decode(first + "=" * (-len(first) % 4))) >= 16


def test_enrolment_needs_a_manager_to_enable_biometrics_first(
    sign_in: Any, staff: User, phone: Any
) -> None:
    response = phone().register(sign_in(staff))
    assert response.status_code == 403
    assert response.json()["code"] == "biometric_not_enabled"


def test_enrolment_needs_a_password_session(
    client: Any, factory: Factory, enabled_staff: User, phone: Any, sign_in: Any
) -> None:
    # A token that did not come from a password sign-in (here: minted by the CLI).
    cli_session = sign_in(enabled_staff)
    cli_session.access_token = factory.token(enabled_staff)
    assert phone().register(cli_session).status_code == 403
    # Nor from a biometric sign-in.
    first = phone()
    assert first.register(sign_in(enabled_staff)).status_code == 201
    bio = first.login().json()["data"]
    bio_session = sign_in(enabled_staff)
    bio_session.access_token = bio["access_token"]
    response = phone().register(bio_session)
    assert response.status_code == 403
    assert response.json()["code"] == "password_session_required"


def test_enrolment_needs_proof_of_possession(sign_in: Any, enabled_staff: User, phone: Any) -> None:
    device = phone()
    impostor = DeviceKey("p256_der")
    device.challenge()
    response = sign_in(enabled_staff).post(
        "/api/v1/auth/biometric/register",
        json={
            "device_id": device.device_id,
            "public_key": device.key.public(),
            "signature": impostor.sign(device.challenge()),
        },
    )
    assert response.status_code == 422
    assert "signature" in response.json()["details"]


@pytest.mark.parametrize("key", ["rsa", "p384", "garbage"])
def test_only_p256_and_ed25519_keys_are_accepted(
    key: str, sign_in: Any, enabled_staff: User, phone: Any
) -> None:
    if key == "rsa":
        public = rsa.generate_private_key(65537, 2048).public_key()
    elif key == "p384":
        public = ec.generate_private_key(ec.SECP384R1()).public_key()
    text = (
        "bm90IGEga2V5"
        if key == "garbage"
        else b64(
            public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    )
    device = phone()
    response = sign_in(enabled_staff).post(
        "/api/v1/auth/biometric/register",
        json={"device_id": device.device_id, "public_key": text, "signature": b64(b"x" * 64)},
    )
    assert response.status_code == 422
    assert "public_key" in response.json()["details"]


def test_a_challenge_cannot_be_replayed(sign_in: Any, enabled_staff: User, phone: Any) -> None:
    device = phone()
    device.register(sign_in(enabled_staff))
    signature = device.key.sign(device.challenge())
    assert device.login(signature).status_code == 200
    replay = device.login(signature)
    assert replay.status_code == 401


def test_a_challenge_expires_after_five_minutes(
    sign_in: Any, enabled_staff: User, phone: Any, resources: Resources
) -> None:
    device = phone()
    device.register(sign_in(enabled_staff))
    signature = device.key.sign(device.challenge())
    resources.extras["clock"] = lambda: utcnow() + timedelta(minutes=5, seconds=1)
    assert device.login(signature).status_code == 401
    resources.extras["clock"] = lambda: utcnow() + timedelta(minutes=4)
    assert device.login(device.key.sign(device.challenge())).status_code == 200


def test_biometric_sign_in_asks_for_the_password_after_30_days(
    sign_in: Any, enabled_staff: User, phone: Any, resources: Resources
) -> None:
    device = phone()
    device.register(sign_in(enabled_staff))
    resources.extras["clock"] = lambda: utcnow() + timedelta(days=30, minutes=1)
    response = device.login()
    assert response.status_code == 401
    assert response.json()["code"] == "password_required"
    resources.extras["clock"] = lambda: utcnow() + timedelta(days=29)
    assert device.login().status_code == 200


def test_a_wrong_key_cannot_sign_in(sign_in: Any, enabled_staff: User, phone: Any) -> None:
    device = phone()
    device.register(sign_in(enabled_staff))
    other = DeviceKey("p256_der")
    assert device.login(other.sign(device.challenge())).status_code == 401


def test_credentials_can_be_listed_and_revoked(
    client: Any, factory: Factory, sign_in: Any, enabled_staff: User, phone: Any, db: Engine
) -> None:
    session = sign_in(enabled_staff)
    device = phone()
    credential = device.register(session).json()["data"]
    listed = session.get("/api/v1/auth/biometric/credentials")
    assert [c["id"] for c in listed.json()["data"]] == [credential["id"]]
    # Nobody else can revoke it.
    stranger = sign_in(factory.user("staff"))
    assert (
        stranger.delete(f"/api/v1/auth/biometric/credentials/{credential['id']}").status_code == 404
    )
    assert (
        session.delete(f"/api/v1/auth/biometric/credentials/{credential['id']}").status_code == 204
    )
    assert session.get("/api/v1/auth/biometric/credentials").json()["data"] == []
    assert device.login().status_code == 401
    with db.connect() as conn:
        assert "biometric.revoked" in list(conn.execute(select(audit_log.c.event)).scalars())


def test_disabling_biometrics_revokes_the_enrolled_keys(
    client: Any, factory: Factory, sign_in: Any, enabled_staff: User, phone: Any
) -> None:
    device = phone()
    device.register(sign_in(enabled_staff))
    admin = factory.user("admin")
    client.patch(
        f"/api/v1/staff/{enabled_staff.id}",
        json={"biometric_enabled": False},
        headers=factory.auth(admin),
    )
    assert device.login().status_code == 401


def test_key_material_is_encrypted_at_rest(
    sign_in: Any, enabled_staff: User, phone: Any, db: Engine
) -> None:
    device = phone("p256_pem")
    device.register(sign_in(enabled_staff))
    body = "".join(device.key.public().splitlines()[1:-1])
    with db.connect() as conn:
        stored = conn.execute(select(biometric_credentials.c.public_key_enc)).scalar_one()
    assert body[:40] not in stored and "BEGIN" not in stored


def test_failed_biometric_attempts_lock_the_account_and_challenges_are_rate_limited(
    client: Any, sign_in: Any, enabled_staff: User, phone: Any, resources: Resources
) -> None:
    from sync_server.ratelimit import RateLimiter, RatePolicy

    device = phone()
    device.register(sign_in(enabled_staff))
    resources.extras["ratelimiter"] = RateLimiter(
        None, RatePolicy(lockout="2/60 seconds", biometric_per_device="6/60 seconds")
    )
    other = DeviceKey("p256_der")
    for _ in range(2):
        assert device.login(other.sign(device.challenge())).status_code == 401
    locked = device.login()
    assert locked.status_code == 429
    assert locked.json()["code"] == "account_locked"
    # Challenge issuance counts towards the per-device limit too.
    limited = client.post("/api/v1/auth/biometric/challenge", json={"device_id": device.device_id})
    assert limited.status_code == 429
    assert "Retry-After" in limited.headers


def test_biometric_sign_in_is_rate_limited_per_account(
    sign_in: Any, enabled_staff: User, phone: Any, resources: Resources
) -> None:
    from sync_server.ratelimit import RateLimiter, RatePolicy

    device = phone()
    device.register(sign_in(enabled_staff))
    resources.extras["ratelimiter"] = RateLimiter(
        None, RatePolicy(biometric_per_account="1/60 seconds")
    )
    assert device.login().status_code == 200
    limited = device.login()
    assert limited.status_code == 429
    assert limited.json()["code"] == "rate_limited"


def test_nobody_can_take_over_a_device_enrolled_by_someone_else(
    client: Any, factory: Factory, sign_in: Any, enabled_staff: User, phone: Any
) -> None:
    device = phone()
    assert device.register(sign_in(enabled_staff)).status_code == 201
    # Another enabled staff member tries to enrol their own key under the same device id.
    admin = factory.user("admin")
    intruder = factory.user("staff")
    client.patch(
        f"/api/v1/staff/{intruder.id}",
        json={"biometric_enabled": True},
        headers=factory.auth(admin),
    )
    hijack = Phone(client, DeviceKey("p256_der"))
    hijack.device_id = device.device_id
    response = hijack.register(sign_in(intruder))
    assert response.status_code == 409
    assert response.json()["code"] == "device_owned_by_other_user"
    assert device.login().status_code == 200
