"""Encryption at rest of sensitive columns (personal contact data, key metadata).

Fernet (AES-128-CBC + HMAC-SHA256) from ``cryptography``, through ``MultiFernet`` so keys rotate:
the first key of ``GALLEY_ENCRYPTION_KEYS`` encrypts, every listed key decrypts, and
:meth:`FieldCipher.rotate` re-encrypts a value under the newest key.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .settings import Settings


class DecryptionError(Exception):
    pass


def _derived_key(secret: str) -> bytes:
    raw = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"galley-fields-v1", info=b"fernet"
    ).derive(secret.encode())
    return base64.urlsafe_b64encode(raw)


class FieldCipher:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is required")
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    @classmethod
    def from_settings(cls, settings: Settings) -> FieldCipher:
        keys = [k.encode() for k in settings.encryption_keys] or [_derived_key(settings.secret_key)]
        return cls(keys)

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise DecryptionError("cannot decrypt with any configured key") from exc

    def rotate(self, token: str) -> str:
        return self._fernet.rotate(token.encode()).decode()
