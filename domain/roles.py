"""Staff roles, from least to most privileged."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    STAFF = "staff"
    MANAGER = "manager"
    ADMIN = "admin"


ROLES: tuple[Role, ...] = (Role.STAFF, Role.MANAGER, Role.ADMIN)


def parse_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise ValueError(f"unknown role {value!r}; expected one of staff, manager, admin") from None
