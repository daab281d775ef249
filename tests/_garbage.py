"""What code leaves to the cyclic garbage collector: for tests that the gateway frees what a
request held by reference counting (proxy/server.py collects the oldest generation rarely)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def collector_off() -> Iterator[None]:
    """Nothing is collected meanwhile, so cycles made inside stay for `cyclic_garbage`."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cyclic_garbage() -> list[object]:
    """The objects only reference cycles keep now (found, then let go by the collector)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def alive(kind: type[T], garbage: list[object]) -> list[T]:
    """Live objects of `kind` that are not in `garbage`."""
    found = {id(o) for o in garbage}
    return [o for o in gc.get_objects() if isinstance(o, kind) and id(o) not in found]
