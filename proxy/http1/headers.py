"""The header mapping shared by the HTTP/1.1 server and client."""

from __future__ import annotations


class Headers(dict[str, str]):
    """Header names lower-cased (latin-1 decoded), repeated fields joined with ", ".

    A plain dict underneath, so lookups run at C speed: ask for names in lower case.
    Built once per message by the parsers' `on_header` callbacks (which merge repeated
    fields themselves: a call per header line is the hot path); never mutated by readers.
    """

    __slots__ = ()

