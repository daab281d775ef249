"""Shared fixtures. Server fixtures (PostgreSQL, Redis) live in their own modules."""

from _postgres import *  # noqa: F401,F403  (pg_url: a real PostgreSQL started for the session)
from _redis import *  # noqa: F401,F403  (redis_url: a real redis-server started for the session)
from _gateway import *  # noqa: F401,F403  (gateway: a real gateway in front of real upstreams)
