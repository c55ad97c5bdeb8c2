"""The one place Galley reads its configuration.

Everything configurable comes from the process environment, optionally completed by a ``.env`` file
(the environment wins). No other module reads ``os.environ``: they receive a :class:`Settings`.
Reading settings has no side effect beyond, in development only, creating ``var/`` and a persisted
development secret so that tokens survive restarts and agree across worker processes.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values
from limits import parse

log = logging.getLogger("galley.settings")

DEFAULT_DATABASE_URL = "sqlite:///./var/galley.db"
ENVIRONMENTS = ("development", "test", "production")


class SettingsError(RuntimeError):
    """The configuration cannot be used (raised at start-up, never at request time)."""


@dataclass(frozen=True)
class Settings:
    env: str = "development"
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    secret_key: str = ""
    #: PEM of an Ed25519 private key for access tokens; derived from ``secret_key`` when empty.
    jwt_private_key: str | None = None
    jwt_issuer: str = "galley"
    jwt_audience: str = "galley-staff-app"
    access_token_ttl_seconds: int = 900
    refresh_token_ttl_seconds: int = 30 * 24 * 3600
    #: Fernet keys, newest first. The first encrypts; all decrypt (rotation).
    encryption_keys: tuple[str, ...] = ()
    stripe_secret_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_base: str | None = None
    storage_dir: str = "./var/storage"
    huey_sqlite_path: str = "./var/huey.db"
    tombstone_retention_days: int = 30
    max_request_bytes: int = 5 * 1024 * 1024
    #: /sync/v1 writes (push, registration) whose blocking work runs at once per process, in
    #: threads; pulls get half as many threads of their own (see Resources.run_blocking).
    db_workers: int = 8
    #: Change-sets of concurrent small pushes applied in one transaction (group commit, see
    #: sync_server.push_group); 0 applies every push alone.
    push_group_limit: int = 64
    #: How long (ms) the next push group waits for the devices just answered that push back to
    #: back (see sync_server.committer); 0: never.
    push_gather_ms: int = 20
    #: Requests to /sync/v1 per user (``limits`` notation); None: unlimited.
    sync_rate_limit: str | None = "1200/minute"
    trust_proxy_headers: bool = False
    log_level: str = "INFO"
    insecure_dev_secret: bool = field(default=False, compare=False)

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _bool(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _int(source: Mapping[str, str | None], name: str, default: int) -> int:
    raw = source.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc


def _rate(source: Mapping[str, str | None], name: str, default: str) -> str | None:
    """A rate in ``limits`` notation ("1200/minute", "20 per second"); "off" for none."""
    raw = (source.get(name) or default).strip()
    if raw.lower() in ("off", "none", "0"):
        return None
    try:
        parse(raw)
    except ValueError as exc:
        raise SettingsError(
            f"{name} must be a rate such as '1200/minute' or 'off', got {raw!r}"
        ) from exc
    return raw


def _dev_secret(var_dir: Path) -> str:
    """A development secret persisted under ``var/`` so every worker and restart agrees on it."""
    path = var_dir / "dev-secret-key"
    if path.exists():
        return path.read_text().strip()
    var_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    path.write_text(value)
    path.chmod(0o600)
    return value


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | os.PathLike[str] | None = ".env"
) -> Settings:
    """Build :class:`Settings` from ``environ`` (default: the process environment) and ``.env``."""
    file_values: dict[str, str | None] = {}
    if env_file is not None and Path(env_file).is_file():
        file_values = dict(dotenv_values(env_file))
    source: dict[str, str | None] = {
        **file_values,
        **(environ if environ is not None else os.environ),
    }

    env = (source.get("GALLEY_ENV") or "development").strip().lower()
    if env not in ENVIRONMENTS:
        raise SettingsError(f"GALLEY_ENV must be one of {', '.join(ENVIRONMENTS)}, got {env!r}")

    database_url = source.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    secret_key = source.get("GALLEY_SECRET_KEY") or ""
    insecure = False
    if not secret_key:
        if env == "production":
            raise SettingsError("GALLEY_SECRET_KEY must be set when GALLEY_ENV=production")
        secret_key = _dev_secret(Path(source.get("GALLEY_VAR_DIR") or "./var"))
        insecure = True
        log.warning(
            "GALLEY_SECRET_KEY is not set: using a generated DEVELOPMENT secret from var/. "
            "Never run like this in production."
        )
    elif env == "production" and len(secret_key) < 32:
        raise SettingsError("GALLEY_SECRET_KEY must be at least 32 characters in production")

    keys_raw = source.get("GALLEY_ENCRYPTION_KEYS") or ""
    encryption_keys = tuple(k.strip() for k in keys_raw.split(",") if k.strip())
    if env == "production" and not encryption_keys:
        raise SettingsError("GALLEY_ENCRYPTION_KEYS must be set when GALLEY_ENV=production")

    sync_rate_limit = _rate(source, "GALLEY_SYNC_RATE_LIMIT", "1200/minute")
    db_workers = _int(source, "GALLEY_DB_WORKERS", 8)
    if db_workers < 1:
        raise SettingsError(f"GALLEY_DB_WORKERS must be at least 1, got {db_workers}")
    push_group_limit = _int(source, "GALLEY_PUSH_GROUP_LIMIT", 64)
    if push_group_limit < 0:
        raise SettingsError(f"GALLEY_PUSH_GROUP_LIMIT must be 0 or more, got {push_group_limit}")
    push_gather_ms = _int(source, "GALLEY_PUSH_GATHER_MS", 20)
    if not 0 <= push_gather_ms <= 100:
        raise SettingsError(f"GALLEY_PUSH_GATHER_MS must be 0 to 100, got {push_gather_ms}")

    return Settings(
        env=env,
        database_url=database_url,
        redis_url=source.get("REDIS_URL") or None,
        secret_key=secret_key,
        jwt_private_key=source.get("GALLEY_JWT_PRIVATE_KEY") or None,
        jwt_issuer=source.get("GALLEY_JWT_ISSUER") or "galley",
        jwt_audience=source.get("GALLEY_JWT_AUDIENCE") or "galley-staff-app",
        access_token_ttl_seconds=min(_int(source, "GALLEY_ACCESS_TOKEN_TTL", 900), 900),
        refresh_token_ttl_seconds=_int(source, "GALLEY_REFRESH_TOKEN_TTL", 30 * 24 * 3600),
        encryption_keys=encryption_keys,
        stripe_secret_key=source.get("STRIPE_SECRET_KEY") or None,
        stripe_webhook_secret=source.get("STRIPE_WEBHOOK_SECRET") or None,
        stripe_api_base=source.get("STRIPE_API_BASE") or None,
        storage_dir=source.get("GALLEY_STORAGE_DIR") or "./var/storage",
        huey_sqlite_path=source.get("GALLEY_HUEY_SQLITE") or "./var/huey.db",
        tombstone_retention_days=_int(source, "GALLEY_TOMBSTONE_RETENTION_DAYS", 30),
        max_request_bytes=_int(source, "GALLEY_MAX_REQUEST_BYTES", 5 * 1024 * 1024),
        db_workers=db_workers,
        push_group_limit=push_group_limit,
        push_gather_ms=push_gather_ms,
        sync_rate_limit=sync_rate_limit,
        trust_proxy_headers=_bool(source.get("GALLEY_TRUST_PROXY_HEADERS")),
        log_level=(source.get("GALLEY_LOG_LEVEL") or "INFO").upper(),
        insecure_dev_secret=insecure,
    )
