"""Access tokens that must never be accepted, on /api/v1 and on the sync endpoint alike."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync_server.resources import Resources
from sync_server.tokens import TokenService
from tests.factories import Factory, User


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(resources: Resources, user: User, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": resources.tokens.issuer,
        "aud": resources.tokens.audience,
        "sub": user.id,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "a" * 32,
        "role": "admin",
        "branches": [],
        "epoch": 0,
    }
    claims.update(overrides)
    return claims


def _unsigned(claims: dict[str, Any], alg: str, key: bytes = b"") -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(key, signing_input, hashlib.sha256).digest() if key else b""
    return f"{header}.{payload}.{_b64(signature)}"


def _forgeries(resources: Resources, user: User) -> dict[str, str]:
    claims = _claims(resources, user)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = TokenService(replace(resources.settings, secret_key="another-deployment-secret-xxxx"))
    wrong_aud = TokenService(replace(resources.settings, jwt_audience="someone-else"))
    wrong_iss = TokenService(replace(resources.settings, jwt_issuer="evil"))
    mint = {"user_id": user.id, "role": "staff", "branch_ids": list(user.branch_ids), "epoch": 0}
    return {
        "alg_none": _unsigned(claims, "none"),
        "alg_none_upper": _unsigned(claims, "None"),
        # HS256 keyed with our public key: the classic algorithm-confusion forgery.
        "hs256_with_public_key": _unsigned(claims, "HS256", resources.tokens.public_key_pem()),
        "rs256": jwt.encode(claims, rsa_key, algorithm="RS256"),
        "eddsa_other_key": jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA"),
        "other_deployment": other.mint(**mint),  # type: ignore[arg-type]
        "expired": resources.tokens.mint(**mint, now=time.time() - 3600),  # type: ignore[arg-type]
        "wrong_audience": wrong_aud.mint(**mint),  # type: ignore[arg-type]
        "wrong_issuer": wrong_iss.mint(**mint),  # type: ignore[arg-type]
        "garbage": "not.a.token",
    }


FORGERIES = [
    "alg_none",
    "alg_none_upper",
    "hs256_with_public_key",
    "rs256",
    "eddsa_other_key",
    "other_deployment",
    "expired",
    "wrong_audience",
    "wrong_issuer",
    "garbage",
]


@pytest.mark.parametrize("kind", FORGERIES)
def test_forged_or_stale_tokens_are_refused_by_the_api(
    kind: str, client: Any, resources: Resources, factory: Factory
) -> None:
    user = factory.user("staff")
    token = _forgeries(resources, user)[kind]
    response = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("kind", ["alg_none", "hs256_with_public_key", "expired", "wrong_audience"])
def test_forged_or_stale_tokens_are_refused_by_the_sync_endpoint(
    kind: str, client: Any, resources: Resources, factory: Factory
) -> None:
    user = factory.user("staff")
    token = _forgeries(resources, user)[kind]
    response = client.post(
        "/sync/v1/devices",
        json={
            "protocol": "1.0",
            "device_id": "0b7c8f5e-1111-4c3a-9a43-2f1d7c1a0001",
            "platform": "ios",
            "app_version": "1.0",
        },
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 401


def test_a_valid_token_is_accepted_so_the_refusals_above_mean_something(
    client: Any, factory: Factory
) -> None:
    user = factory.user("staff")
    response = client.get("/api/v1/users/me", headers=factory.auth(user))
    assert response.status_code == 200
