"""Request and response bodies of /api/v1, declared once (msgspec Structs).

They validate requests, encode responses and generate the OpenAPI document. Request structs
forbid unknown fields, so a client sending ``role`` to ``PATCH /users/me`` gets a 422 naming it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

Uuid = Annotated[str, Meta(pattern=UUID_PATTERN, description="A UUID")]
Email = Annotated[str, Meta(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
Username = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
Password = Annotated[str, Meta(min_length=1, max_length=1024)]
DisplayName = Annotated[str, Meta(min_length=1, max_length=200)]
Phone = Annotated[str, Meta(min_length=3, max_length=32, pattern=r"^\+?[0-9 ()./-]+$")]
RoleName = Literal["staff", "manager", "admin"]
OpaqueToken = Annotated[str, Meta(min_length=1, max_length=512)]
Base64 = Annotated[str, Meta(min_length=1, max_length=4096, description="base64 or base64url")]


def utc(moment: datetime) -> datetime:
    """A database timestamp (naive UTC) as an aware one, so JSON carries the ``Z`` offset."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def utc_or_none(moment: datetime | None) -> datetime | None:
    return utc(moment) if moment is not None else None


class Request(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies."""


# --- accounts -----------------------------------------------------------------------------------


class User(Struct, kw_only=True):
    id: str
    email: str
    username: str | None
    display_name: str
    phone: str | None
    role: RoleName
    branch_ids: list[str]
    is_active: bool
    biometric_enabled: bool
    last_password_login_at: datetime | None
    created_at: datetime


class LoginRequest(Request):
    """Sign in with an email or a username (exactly one) and the password."""

    password: Password
    email: Email | None = None
    username: Username | None = None
    device_id: Uuid | None = None


class Session(Struct, kw_only=True):
    access_token: str
    refresh_token: str
    token_type: str = "Bearer"
    expires_in: int
    user: User


class RefreshRequest(Request):
    refresh_token: OpaqueToken


class LogoutRequest(Request):
    refresh_token: OpaqueToken


class ProfilePatch(Request):
    """Fields a user may change about themselves."""

    display_name: DisplayName | UnsetType = UNSET
    phone: Phone | UnsetType | None = UNSET


class PasswordChange(Request):
    current_password: Password
    new_password: Password


# --- biometric ---------------------------------------------------------------------------------


class ChallengeRequest(Request):
    device_id: Uuid


class Challenge(Struct, kw_only=True):
    challenge: str
    expires_at: datetime


class BiometricRegistration(Request):
    """Enrol this device's key: ``signature`` is the key's signature of an outstanding challenge
    (its ASCII text), proving possession. ``public_key``: SubjectPublicKeyInfo (PEM or base64 DER),
    or a raw Ed25519 (32 bytes) / uncompressed P-256 point (65 bytes), base64."""

    device_id: Uuid
    public_key: Annotated[str, Meta(min_length=1, max_length=4096)]
    signature: Base64


class BiometricLogin(Request):
    device_id: Uuid
    challenge_response: Base64


class BiometricCredential(Struct, kw_only=True):
    id: str
    device_id: str
    algorithm: str
    created_at: datetime
    last_used_at: datetime | None


# --- staff management -------------------------------------------------------------------------


class StaffQuery(Struct, kw_only=True):
    branch_id: Uuid | None = None


class StaffCreate(Request):
    email: Email
    password: Password
    role: RoleName = "staff"
    branch_ids: Annotated[list[Uuid], Meta(max_length=100)] = []
    display_name: DisplayName | None = None
    phone: Phone | None = None
    username: Username | None = None


class StaffPatch(Request):
    role: RoleName | UnsetType = UNSET
    branch_ids: Annotated[list[Uuid], Meta(max_length=100)] | UnsetType = UNSET
    display_name: DisplayName | UnsetType = UNSET
    biometric_enabled: bool | UnsetType = UNSET


# --- audit ----------------------------------------------------------------------------------------


class AuditQuery(Struct, kw_only=True):
    event: Annotated[str, Meta(max_length=48)] | None = None
    subject_user_id: Uuid | None = None


class AuditEntry(Struct, kw_only=True):
    id: int
    occurred_at: datetime
    event: str
    outcome: str
    actor_user_id: str | None
    subject_user_id: str | None
    ip: str | None
    details: dict[str, Any]


class PageMeta(Struct, kw_only=True):
    next_cursor: str | None
    limit: int


class Error(Struct, kw_only=True):
    """The error shape of every 4xx/5xx."""

    code: str
    message: str
    details: dict[str, list[str]]
