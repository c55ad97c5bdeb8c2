"""Device-bound public keys for biometric login: parsing and signature checks (``cryptography``).

Phones keep the private key in their secure hardware (Secure Enclave, Android Keystore) behind a
biometric prompt, and sign server challenges with it. Accepted keys: ECDSA P-256 (what both
platforms' secure hardware offers) and Ed25519. iOS exports a P-256 key as a raw uncompressed
point and signs in DER; some libraries sign raw ``r || s``: all of these are accepted.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

ES256 = "ES256"
ED25519 = "Ed25519"

DevicePublicKey = ec.EllipticCurvePublicKey | Ed25519PublicKey


class UnsupportedKey(ValueError):
    """Not a P-256 or Ed25519 public key in a format we read."""


def b64decode(text: str) -> bytes:
    """Decode base64 or base64url, with or without padding."""
    cleaned = "".join(text.split())
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(padded.encode())
        return base64.b64decode(padded.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


def parse_public_key(text: str) -> tuple[str, DevicePublicKey]:
    """(algorithm, key) from PEM, base64 DER SubjectPublicKeyInfo or a raw base64 key."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key: object = serialization.load_pem_public_key(text.encode())
        else:
            raw = b64decode(text)
            if len(raw) == 32:
                key = Ed25519PublicKey.from_public_bytes(raw)
            elif len(raw) == 65 and raw[0] == 4:
                key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
            else:
                key = serialization.load_der_public_key(raw)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UnsupportedKey(f"cannot read the public key: {exc}") from None
    if isinstance(key, Ed25519PublicKey):
        return ED25519, key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return ES256, key
    raise UnsupportedKey("only ECDSA P-256 and Ed25519 keys are accepted")


def to_pem(key: DevicePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def verify(key: DevicePublicKey, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``key``'s signature of ``message``."""
    if isinstance(key, Ed25519PublicKey):
        try:
            key.verify(signature, message)
            return True
        except InvalidSignature:
            return False
    candidates = [signature]
    if len(signature) == 64:  # raw r || s rather than DER
        candidates.append(
            encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
        )
    for candidate in candidates:
        try:
            key.verify(candidate, message, ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, ValueError):
            continue
    return False
