"""Typed fields of synced entities and the validation of values a device sends for them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

Value = str | int | float | bool | None


@dataclass(frozen=True)
class FieldError:
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
                try:
                    uuid.UUID(value)
                except ValueError:
                    return FieldError(name, "invalid", f"{name} must be a UUID")
                return None
            if len(value) > self.max_length:
                return FieldError(name, "too_long", f"{name} is longer than {self.max_length}")
            if len(value.strip()) < self.min_length:
                return FieldError(name, "too_short", f"{name} must not be blank")
            if self.choices is not None and value not in self.choices:
                allowed = ", ".join(self.choices)
                return FieldError(name, "invalid_choice", f"{name} must be one of {allowed}")
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


def text(max_length: int = 200, *, nullable: bool = False, min_length: int = 1) -> Field:
    return Field("text", nullable=nullable, max_length=max_length, min_length=min_length)


def money(*, nullable: bool = False) -> Field:
    return Field("money", nullable=nullable, min_value=0, max_value=100_000_000)


def boolean() -> Field:
    return Field("bool")


def integer(min_value: int | None = None, max_value: int | None = None) -> Field:
    return Field("int", min_value=min_value, max_value=max_value)


def uuid_ref(*, nullable: bool = False) -> Field:
    return Field("uuid", nullable=nullable)


def choice(*choices: str) -> Field:
    return Field("text", choices=choices, max_length=max(len(c) for c in choices))


def text_list() -> Field:
    return Field("text_list")
