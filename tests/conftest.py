"""Shared fixtures. Server fixtures (PostgreSQL, Redis) live in their own modules."""

import socket
from collections.abc import Iterator

import pytest

from _postgres import *  # noqa: F401,F403  (pg_url: a real PostgreSQL started for the session)
from _redis import *  # noqa: F401,F403  (redis_url: a real redis-server started for the session)
from _gateway import *  # noqa: F401,F403  (gateway: a real gateway in front of real upstreams)


@pytest.fixture(autouse=True)
def _fast_tier_opens_no_sockets(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test marked `fast` that connects or listens belongs to the integration tier."""
    if request.node.get_closest_marker("fast") is not None:

        def refuse(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("a test marked fast opened a socket: it belongs to the integration tier")

        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket.socket, "bind", refuse)
    yield
