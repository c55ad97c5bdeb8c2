"""The long-lived resources of a running Galley process, built from settings.

Built once in the application lifespan (or by the CLI), never at import time, and closed on
shutdown. Every request handler reaches them through ``request.app.state.resources``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from .crypto import FieldCipher
from .db import create_db_engine
from .pubsub import PubSub, create_pubsub
from .settings import Settings
from .tokens import TokenService

log = logging.getLogger("galley.resources")


@dataclass
class Resources:
    settings: Settings
    engine: Engine
    tokens: TokenService
    cipher: FieldCipher
    pubsub: PubSub
    redis: Any | None = None  # redis.Redis when REDIS_URL is configured
    extras: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        self.pubsub.close()
        if self.redis is not None:
            self.redis.close()
        self.engine.dispose()


def build_resources(settings: Settings, *, engine: Engine | None = None) -> Resources:
    """Create the engine, Redis client, pub/sub and token service for ``settings``."""
    redis_client = None
    if settings.redis_url:
        import redis

        redis_client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30
        )
    return Resources(
        settings=settings,
        engine=engine or create_db_engine(settings.database_url),
        tokens=TokenService(settings),
        cipher=FieldCipher.from_settings(settings),
        pubsub=create_pubsub(redis_client),
        redis=redis_client,
    )
