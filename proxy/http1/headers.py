"""Case-insensitive header mapping shared by the HTTP/1.1 server and client."""

from __future__ import annotations


class Headers(dict[str, str]):
    """Header names lower-cased (latin-1 decoded), repeated fields joined with ", ".

    `get` and `in` accept any case. Built once per message by the parsers through
    `add`; never mutated by readers.
    """

    __slots__ = ()

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        # Lower-case names (what the hot path asks for) cost one lookup.
        value = dict.get(self, name)
        if value is None:
            return dict.get(self, name.lower(), default) if not name.islower() else default
        return value

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name.lower() if isinstance(name, str) else name)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def add(self, name: bytes, value: bytes) -> None:
        # bytes.lower() changes ASCII letters only, which is all a header name may hold.
        key = name.lower().decode("latin-1")
        text = value.decode("latin-1")
        size = len(self)
        old = self.setdefault(key, text)
        if len(self) == size:  # the name was there already: a repeated field
            dict.__setitem__(self, key, f"{old}, {text}")
