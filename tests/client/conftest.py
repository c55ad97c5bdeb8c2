"""Fixtures for the reference client's tests: the real app over the ``db`` fixture."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from sync_server.app import create_app
from sync_server.resources import Resources
from tests.client.harness import FlakyHttp


@pytest.fixture
def app(resources: Resources) -> Any:
    return create_app(resources=resources)


@pytest.fixture
def network(app: Any) -> Iterator[Callable[[], FlakyHttp]]:
    """Makes one network per device (each can fail on its own), all to the same server."""
    with ExitStack() as stack:

        def make() -> FlakyHttp:
            return stack.enter_context(FlakyHttp(app))

        yield make
