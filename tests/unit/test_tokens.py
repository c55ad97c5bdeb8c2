"""Access tokens verified once per process: what the cache of verified tokens must not change."""

from __future__ import annotations

import time

import pytest

from sync_server.settings import Settings
from sync_server.tokens import LEEWAY, InvalidToken, TokenService


@pytest.fixture
def tokens() -> TokenService:
    return TokenService(Settings(secret_key="unit-test-secret-key-0123456789-abcdef"))


def mint(tokens: TokenService, ttl: int = 900) -> str:
    return tokens.mint(user_id="u1", role="staff", branch_ids=["b1"], epoch=0, ttl=ttl)


def test_a_token_verified_again_gives_the_same_claims(tokens: TokenService) -> None:
    token = mint(tokens)
    assert tokens.verify(token) == tokens.verify(token)


def test_a_remembered_token_still_expires(tokens: TokenService) -> None:
    token = mint(tokens)
    claims = tokens.verify(token)  # now remembered
    assert tokens.verify(token, now=claims.expires_at) == claims
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(token, now=claims.expires_at + 1)


def test_a_remembered_token_expires_against_the_clock_with_the_usual_leeway(
    tokens: TokenService,
) -> None:
    token = tokens.mint(
        user_id="u1",
        role="staff",
        branch_ids=[],
        epoch=0,
        now=time.time() - 100,
        ttl=100 - LEEWAY + 2,
    )
    tokens.verify(token)  # expired 3 s ago, within the leeway: accepted and remembered
    time.sleep(3)
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(token)


def test_a_tampered_copy_of_a_remembered_token_is_refused(tokens: TokenService) -> None:
    token = mint(tokens)
    tokens.verify(token)
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    with pytest.raises(InvalidToken):
        tokens.verify(forged)
