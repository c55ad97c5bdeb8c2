"""Settings come from the environment (and .env), with safe defaults and loud refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from sync_server.settings import DEFAULT_DATABASE_URL, SettingsError, load_settings


def test_defaults_give_an_embedded_sqlite_deployment(tmp_path: Path) -> None:
    settings = load_settings({"GALLEY_VAR_DIR": str(tmp_path)}, env_file=None)
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.redis_url is None
    assert settings.insecure_dev_secret
    # The generated development secret is persisted so every worker process agrees on it.
    again = load_settings({"GALLEY_VAR_DIR": str(tmp_path)}, env_file=None)
    assert again.secret_key == settings.secret_key


def test_production_refuses_to_start_without_a_secret() -> None:
    with pytest.raises(SettingsError, match="GALLEY_SECRET_KEY"):
        load_settings({"GALLEY_ENV": "production"}, env_file=None)


def test_production_requires_encryption_keys() -> None:
    with pytest.raises(SettingsError, match="GALLEY_ENCRYPTION_KEYS"):
        load_settings({"GALLEY_ENV": "production", "GALLEY_SECRET_KEY": "x" * 40}, env_file=None)


def test_environment_wins_over_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DATABASE_URL=sqlite:///from-file.db\nREDIS_URL=redis://file:6379/0\n")
    settings = load_settings(
        {"DATABASE_URL": "sqlite:///from-env.db", "GALLEY_SECRET_KEY": "k" * 40}, env_file=env_file
    )
    assert settings.database_url == "sqlite:///from-env.db"
    assert settings.redis_url == "redis://file:6379/0"


def test_access_tokens_never_live_longer_than_fifteen_minutes() -> None:
    settings = load_settings(
        {"GALLEY_SECRET_KEY": "k" * 40, "GALLEY_ACCESS_TOKEN_TTL": "86400"}, env_file=None
    )
    assert settings.access_token_ttl_seconds == 900


def test_a_malformed_number_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="GALLEY_MAX_REQUEST_BYTES"):
        load_settings(
            {"GALLEY_SECRET_KEY": "k" * 40, "GALLEY_MAX_REQUEST_BYTES": "lots"}, env_file=None
        )


def test_unknown_environment_is_refused() -> None:
    with pytest.raises(SettingsError, match="GALLEY_ENV"):
        load_settings({"GALLEY_ENV": "staging"}, env_file=None)


def test_the_number_of_database_workers_is_configurable_and_at_least_one() -> None:
    assert load_settings({"GALLEY_SECRET_KEY": "k" * 40}, env_file=None).db_workers == 8
    settings = load_settings({"GALLEY_SECRET_KEY": "k" * 40, "GALLEY_DB_WORKERS": "3"}, None)
    assert settings.db_workers == 3
    with pytest.raises(SettingsError, match="GALLEY_DB_WORKERS"):
        load_settings({"GALLEY_SECRET_KEY": "k" * 40, "GALLEY_DB_WORKERS": "0"}, env_file=None)


def test_push_groups_hold_64_change_sets_unless_configured_and_0_turns_them_off() -> None:
    base = {"GALLEY_SECRET_KEY": "k" * 40}
    assert load_settings(base, env_file=None).push_group_limit == 64
    assert load_settings({**base, "GALLEY_PUSH_GROUP_LIMIT": "0"}, None).push_group_limit == 0
    with pytest.raises(SettingsError, match="GALLEY_PUSH_GROUP_LIMIT"):
        load_settings({**base, "GALLEY_PUSH_GROUP_LIMIT": "-1"}, env_file=None)


def test_the_sync_rate_limit_is_a_rate_or_off() -> None:
    base = {"GALLEY_SECRET_KEY": "k" * 40}
    assert load_settings(base, env_file=None).sync_rate_limit == "1200/minute"
    assert load_settings({**base, "GALLEY_SYNC_RATE_LIMIT": "50/second"}, None).sync_rate_limit == (
        "50/second"
    )
    assert load_settings({**base, "GALLEY_SYNC_RATE_LIMIT": "off"}, None).sync_rate_limit is None
    with pytest.raises(SettingsError, match="GALLEY_SYNC_RATE_LIMIT"):
        load_settings({**base, "GALLEY_SYNC_RATE_LIMIT": "lots"}, env_file=None)


def test_push_groups_gather_prompt_devices_for_20_ms_unless_configured_within_0_to_100() -> None:
    base = {"GALLEY_SECRET_KEY": "k" * 40}
    assert load_settings(base, env_file=None).push_gather_ms == 20
    assert load_settings({**base, "GALLEY_PUSH_GATHER_MS": "0"}, None).push_gather_ms == 0
    for wrong in ("-1", "101"):
        with pytest.raises(SettingsError, match="GALLEY_PUSH_GATHER_MS"):
            load_settings({**base, "GALLEY_PUSH_GATHER_MS": wrong}, env_file=None)
