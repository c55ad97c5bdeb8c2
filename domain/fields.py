"""Typed fields of synced entities and the validation of values a device sends for them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

Value = str | int | float | bool | None

# The wire form of every id (see ``sync_protocol.messages.UUID_PATTERN``). ``uuid.UUID`` would
# also take braces, a ``urn:uuid:`` prefix or 32 bare hex digits: each of those would name the
# same row (or branch) with a different string, and a branch scope spelt differently is a scope
# no device ever pulls.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

#: Bounds of an unbounded ``int`` field: what a signed 64-bit column holds. msgspec decodes
#: arbitrarily large integers, and one past the column's range would be a database error (a 500).
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def is_uuid(value: object) -> bool:
    """Whether ``value`` is a UUID in the 8-4-4-4-12 form of the wire protocol (any case)."""
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


@dataclass(frozen=True)
class FieldError:
    """Why a value was refused: ``code`` is machine-readable (``required``, ``wrong_type``,
    ``too_long``, ``too_short``, ``invalid``, ``invalid_choice``, ``out_of_range``,
    ``read_only``, ...), ``message`` is for people."""

    field: str
    code: str
    message: str


@dataclass(frozen=True)
class Field:
    """One syncable field. ``kind`` is one of ``text``, ``int``, ``bool``, ``uuid``, ``money``
    (integer cents, never a float) or ``text_list`` (server-written only)."""

    kind: str
    nullable: bool = False
    max_length: int = 200
    min_value: int | None = None
    max_value: int | None = None
    min_length: int = 0
    choices: tuple[str, ...] | None = None

    def check(self, name: str, value: Any) -> FieldError | None:
        """Return why ``value`` is not acceptable for this field, or None."""
        if value is None:
            return (
                None if self.nullable else FieldError(name, "required", f"{name} may not be null")
            )
        if self.kind in ("text", "uuid"):
            if not isinstance(value, str):
                return FieldError(name, "wrong_type", f"{name} must be a string")
            if self.kind == "uuid":
                if not is_uuid(value):
                    return FieldError(name, "invalid", f"{name} must be a UUID")
                return None
            # Choices first: "dozen" for a unit is not a valid choice, not merely too long.
            if self.choices is not None:
                if value in self.choices:
                    return None
                allowed = ", ".join(self.choices)
                return FieldError(name, "invalid_choice", f"{name} must be one of {allowed}")
            if len(value) > self.max_length:
                return FieldError(name, "too_long", f"{name} is longer than {self.max_length}")
            if len(value.strip()) < self.min_length:
                message = (
                    f"{name} must not be blank"
                    if self.min_length == 1
                    else f"{name} needs at least {self.min_length} characters besides spaces"
                )
                return FieldError(name, "too_short", message)
            return None
        if self.kind in ("int", "money"):
            # bool is an int in Python; a device sending true for a price is a bug, not 1 cent.
            if not isinstance(value, int) or isinstance(value, bool):
                return FieldError(name, "wrong_type", f"{name} must be an integer")
            if self.min_value is not None and value < self.min_value:
                return FieldError(name, "out_of_range", f"{name} must be >= {self.min_value}")
            if self.max_value is not None and value > self.max_value:
                return FieldError(name, "out_of_range", f"{name} must be <= {self.max_value}")
            return None
        if self.kind == "bool":
            if not isinstance(value, bool):
                return FieldError(name, "wrong_type", f"{name} must be a boolean")
            return None
        return FieldError(name, "read_only", f"{name} cannot be written by devices")

    def canonical(self, value: Value) -> Value:
        """The one spelling of a valid ``value`` that is stored and compared.

        UUIDs are stored lower-case (ids are compared as strings, and iOS spells them in upper
        case); every other value is already canonical. Only call this on a value that passed
        :meth:`check`.
        """
        if self.kind == "uuid" and isinstance(value, str):
            return value.lower()
        return value


def text(max_length: int = 200, *, nullable: bool = False, min_length: int = 1) -> Field:
    """A string of at most ``max_length`` characters, not blank unless ``min_length`` is 0."""
    return Field("text", nullable=nullable, max_length=max_length, min_length=min_length)


def money(*, nullable: bool = False) -> Field:
    """An amount in integer cents, from 0 to one million (in the currency's main unit)."""
    return Field("money", nullable=nullable, min_value=0, max_value=100_000_000)


def boolean() -> Field:
    """True or false (never 0/1)."""
    return Field("bool")


def integer(min_value: int = INT64_MIN, max_value: int = INT64_MAX) -> Field:
    """An integer (never a bool or a float) within ``min_value``..``max_value``."""
    return Field("int", min_value=min_value, max_value=max_value)


def uuid_ref(*, nullable: bool = False) -> Field:
    """A reference to a row by its UUID (stored lower-case)."""
    return Field("uuid", nullable=nullable)


def choice(*choices: str) -> Field:
    """One of ``choices``, exactly as spelt."""
    if not choices:
        raise ValueError("a choice field needs at least one choice")
    return Field("text", choices=choices, max_length=max(len(c) for c in choices))


def text_list() -> Field:
    """A list of strings the server writes (devices may only read it)."""
    return Field("text_list")
