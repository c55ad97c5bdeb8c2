"""Password hashing with argon2id (argon2-cffi), the memory-hard default of OWASP."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()  # argon2id with the library's maintained default parameters


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


#: A real hash of a random password, verified against when the account does not exist, so that
#: a login for an unknown email costs the same time as one for a known email.
DUMMY_HASH = _hasher.hash("galley-timing-equaliser-not-a-password")
