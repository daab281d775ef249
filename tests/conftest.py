"""Shared fixtures. Server fixtures (PostgreSQL, Redis) live in their own modules."""

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

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


@pytest.fixture
async def genai_client() -> AsyncIterator[Callable[..., Any]]:
    """`client = genai_client(gw, version)`: google-genai's async client on the gateway,
    closed after the test (left to the collector, its close runs on a closed loop and
    fails whichever test comes next)."""
    from google import genai
    from google.genai import types as gtypes

    made: list[Any] = []

    def make(gw: Any, version: str = "v1beta") -> Any:
        made.append(genai.Client(api_key=gw.key, http_options=gtypes.HttpOptions(base_url=gw.url, api_version=version)))
        return made[-1].aio

    yield make
    for client in made:
        await client.aio.aclose()
