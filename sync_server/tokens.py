"""Access tokens: short-lived JWTs signed with Ed25519 (``EdDSA``), algorithm pinned.

The signing key comes from settings (``GALLEY_JWT_PRIVATE_KEY``, PEM) or, when absent, is derived
from ``GALLEY_SECRET_KEY`` with HKDF so every process of a deployment agrees on it without extra
configuration. Verification accepts exactly one algorithm, so ``alg: none`` and HS256-with-the-
public-key confusion tokens are refused by construction, and checks ``iss``, ``aud`` and ``exp``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .settings import Settings

ALGORITHM = "EdDSA"
#: Verified tokens remembered per process (see TokenService.verify); cleared when full.
VERIFIED_CACHE_SIZE = 4096
#: Seconds of clock skew tolerated on exp/nbf/iat.
LEEWAY = 5


class InvalidToken(Exception):
    """The token is malformed, forged, expired or not meant for us."""


@dataclass(frozen=True)
class AccessClaims:
    user_id: str
    role: str
    branch_ids: tuple[str, ...]
    epoch: int
    device_id: str | None = None
    token_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    expires_at: int = 0


def _derive_private_key(secret: str) -> Ed25519PrivateKey:
    seed = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"galley-jwt-v1", info=b"ed25519-signing-key"
    ).derive(secret.encode())
    return Ed25519PrivateKey.from_private_bytes(seed)


class TokenService:
    """Mints and verifies access tokens for one deployment."""

    def __init__(self, settings: Settings) -> None:
        if settings.jwt_private_key:
            key = serialization.load_pem_private_key(settings.jwt_private_key.encode(), None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("GALLEY_JWT_PRIVATE_KEY must be an Ed25519 private key")
            self._private = key
        else:
            self._private = _derive_private_key(settings.secret_key)
        self._public: Ed25519PublicKey = self._private.public_key()
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.ttl = settings.access_token_ttl_seconds
        # token -> its claims, for tokens whose signature and claims were already checked. A
        # device sends the same token with every request for up to its lifetime; verifying an
        # Ed25519 signature and parsing the claims again each time was a visible share of a
        # small push's CPU. Only expiry changes with time, and it is checked on every hit.
        # Whether the user may still use the token (deactivation, sign-out, epoch) is not
        # cached here: that is read from the database on every request (authn.load_identity).
        self._verified: dict[str, AccessClaims] = {}

    def public_key_pem(self) -> bytes:
        return self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def mint(
        self,
        *,
        user_id: str,
        role: str,
        branch_ids: tuple[str, ...] | list[str],
        epoch: int,
        device_id: str | None = None,
        now: float | None = None,
        ttl: int | None = None,
    ) -> str:
        issued = int(now if now is not None else time.time())
        payload = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user_id,
            "iat": issued,
            "nbf": issued,
            "exp": issued + (ttl if ttl is not None else self.ttl),
            "jti": uuid.uuid4().hex,
            "role": role,
            "branches": list(branch_ids),
            "epoch": epoch,
        }
        if device_id:
            payload["device"] = device_id
        return jwt.encode(payload, self._private, algorithm=ALGORITHM)

    def verify(self, token: str, *, now: float | None = None) -> AccessClaims:
        claims = self._verified.get(token)
        if claims is not None:
            # The same judgement as a first verification: PyJWT's (with leeway) against the
            # clock, or the caller's ``now`` strictly.
            if (
                claims.expires_at < now
                if now is not None
                else claims.expires_at + LEEWAY < time.time()
            ):
                raise InvalidToken("token expired")
            return claims
        claims = self._verify(token, now=now)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    def _verify(self, token: str, *, now: float | None = None) -> AccessClaims:
        try:
            payload = jwt.decode(
                token,
                self._public,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
                leeway=LEEWAY,
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from exc
        if now is not None and payload["exp"] < now:
            raise InvalidToken("token expired")
        try:
            branches = payload.get("branches", [])
            if not isinstance(branches, list) or not all(isinstance(b, str) for b in branches):
                raise InvalidToken("malformed branches claim")
            device = payload.get("device")
            return AccessClaims(
                user_id=str(payload["sub"]),
                role=str(payload["role"]),
                branch_ids=tuple(branches),
                epoch=int(payload.get("epoch", 0)),
                device_id=str(device) if device else None,
                token_id=str(payload["jti"]),
                expires_at=int(payload["exp"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidToken("malformed claims") from exc
