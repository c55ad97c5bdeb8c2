"""Fixtures for the /api/v1 tests: signing in over HTTP as a factory-made user."""

from __future__ import annotations

from typing import Any

import pytest

from tests.factories import Factory, User


class Session:
    """A signed-in client session (tokens from a real POST /api/v1/auth/login)."""

    def __init__(self, client: Any, user: User, body: dict[str, Any]) -> None:
        self.client = client
        self.user = user
        self.access_token: str = body["access_token"]
        self.refresh_token: str = body["refresh_token"]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, headers=self.headers, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.client.post(
            path, headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs
        )

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.client.patch(path, headers=self.headers, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.client.delete(path, headers=self.headers, **kwargs)


def login(client: Any, user: User, password: str | None = None, **extra: Any) -> Any:
    return client.post(
        "/api/v1/auth/login",
        json={"email": user.email, "password": password or user.password, **extra},
    )


@pytest.fixture
def sign_in(client: Any) -> Any:
    def sign_in(user: User, **extra: Any) -> Session:
        response = login(client, user, **extra)
        assert response.status_code == 200, response.text
        return Session(client, user, response.json()["data"])

    return sign_in


@pytest.fixture
def staff(factory: Factory) -> User:
    return factory.user("staff")
