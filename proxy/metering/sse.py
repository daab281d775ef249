"""Incremental Server-Sent Events framing over raw bytes.

The tee hands every upstream chunk to a splitter. It works on bytes only, so a
multi-byte UTF-8 character split across chunks is simply held until its event is
complete; nothing is decoded here. An event is everything up to and including the
blank line that ends it, byte for byte, so the concatenation of all returned events
plus `flush()` is exactly the input. Line endings are CRLF, LF or a lone CR, mixed
freely (WHATWG SSE).

Cost: O(n) over the stream. The search resumes where the previous chunk stopped, so no
byte is scanned twice; LF-only data (OpenAI, Anthropic) is cut with one `bytes.find`
per event, anything with a CR with a C-level regex per line. A chunk that arrives while
nothing is pending is sliced directly, never copied into the buffer first.
"""

from __future__ import annotations

import re
from itertools import pairwise

DEFAULT_MAX_EVENT_SIZE = 8 * 1024 * 1024

# One line terminator. CRLF is tried first so it is never read as CR + empty line.
_EOL = re.compile(rb"\r\n|\r|\n")
_ONLY_EOLS = re.compile(rb"[\r\n]*")
_CR = 13
_COLON = 58


class SSEEventTooLarge(ValueError):
    """An event grew past `max_event_size` without its terminating blank line.

    The splitter keeps every byte it has not returned yet, so `flush()` still hands
    them back: a caller can switch to pass-through without losing anything.
    """


class SSESplitter:
    """Split a byte stream into complete raw SSE events, whatever the chunking."""

    __slots__ = ("_buf", "_line", "_scan", "_max")

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self._buf = bytearray()   # bytes of the incomplete event; starts at an event start
        self._line = 0            # offset in _buf where the current unterminated line begins
        self._scan = 0            # offset in _buf where the terminator search resumes
        self._max = max_event_size

    def pending(self) -> bytes:
        """Bytes fed but not yet returned as a complete event."""
        return bytes(self._buf)

    @property
    def buffered(self) -> int:
        """How many bytes are pending (cheap; no copy)."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete events ended by this chunk, oldest first (possibly none).

        Raises SSEEventTooLarge when an event exceeds the limit; after that only
        `flush()` is meaningful (it returns every byte not yet returned).
        """
        buf = self._buf
        if buf:
            buf += chunk
            ends = self._ends(buf)
            self._check(ends, len(buf))
            if not ends:
                return []
            with memoryview(buf) as mv:
                events = [bytes(mv[a:b]) for a, b in pairwise([0, *ends])]
            last = ends[-1]
            del buf[:last]            # CPython drops a bytearray prefix without moving the rest
        else:
            # Common case: nothing pending, so slice the events straight out of the chunk
            # (a chunk that is exactly one event comes back as the same object).
            ends = self._ends(chunk)
            try:
                self._check(ends, len(chunk))
            except SSEEventTooLarge:
                buf += chunk          # keep every unreturned byte for flush()
                raise
            if len(ends) == 1:
                events = [chunk[:ends[0]]]   # the usual chunk: one event (same object if whole)
            else:
                events = [chunk[a:b] for a, b in pairwise([0, *ends])]
            last = ends[-1] if ends else 0
            if last < len(chunk):
                with memoryview(chunk) as mv:
                    buf += mv[last:]
        self._line -= last
        self._scan -= last
        return events

    def flush(self) -> bytes:
        """Everything still pending at EOF (an unterminated last event), then reset."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._line = self._scan = 0
        return rest

    def _ends(self, data: bytes | bytearray) -> list[int]:
        """Offsets just past each blank line found since the last call; advances state."""
        if data.find(b"\r", self._scan) == -1:
            return self._ends_lf(data)
        ends: list[int] = []
        line = self._line
        scan = len(data)
        for m in _EOL.finditer(data, self._scan):
            s, e = m.span()
            if e == len(data) and e - s == 1 and data[s] == _CR:
                scan = s              # a trailing CR may be the first half of CRLF: wait
                break
            if s == line:             # empty line: the event ends here
                ends.append(e)
            line = e
        self._line, self._scan = line, scan
        return ends

    def _ends_lf(self, data: bytes | bytearray) -> list[int]:
        # LF-only data (OpenAI, Anthropic): every "\n\n" is a line end plus a blank line,
        # so one memchr-speed find per event instead of a regex step per line. At a line
        # start the search begins one byte early, on the LF that ended the previous line,
        # so a blank line right there is found too (a CR there cannot precede an LF).
        ends: list[int] = []
        line, pos = self._line, self._scan
        if pos == 0 and data[:1] == b"\n":   # blank line opening the buffer: empty event
            ends.append(1)
            line = pos = 1
        while (i := data.find(b"\n\n", pos - 1 if pos == line and pos else pos)) != -1:
            pos = line = i + 2
            ends.append(pos)
        last_lf = data.rfind(b"\n", pos)
        self._line = last_lf + 1 if last_lf != -1 else line
        self._scan = len(data)
        return ends

    def _check(self, ends: list[int], total: int) -> None:
        if total <= self._max:
            return                    # no part of `total` bytes can be longer than the whole
        start = 0
        for end in (*ends, total):    # complete events, then the pending remainder
            if end - start > self._max:
                raise SSEEventTooLarge(f"SSE event of more than {self._max} bytes")
            start = end


def _fields(event: bytes) -> list[tuple[bytes, bytes]]:
    lines = event.split(b"\n") if b"\r" not in event else _EOL.split(event)
    out: list[tuple[bytes, bytes]] = []
    for line in lines:
        if not line or line[0] == _COLON:    # blank line or comment (": ping")
            continue
        name, _, value = line.partition(b":")
        if value[:1] == b" ":                 # the spec strips exactly one space
            value = value[1:]
        out.append((name, value))
    return out


def event_data(event: bytes) -> bytes | None:
    """The event's `data` field values joined with LF, or None when it has none."""
    if event.startswith(b"data:"):
        # Fast path for the usual single-line event ("data: {...}\n\n").
        m = _EOL.search(event)
        if m is None or _ONLY_EOLS.fullmatch(event, m.end()):
            value = event[5:m.start() if m else len(event)]
            return value[1:] if value[:1] == b" " else value
    data = [value for name, value in _fields(event) if name == b"data"]
    if not data:
        return None
    return data[0] if len(data) == 1 else b"\n".join(data)


def event_name(event: bytes) -> bytes | None:
    """The value of the event's last `event` field, or None."""
    if not event.startswith(b"event") and b"\nevent" not in event and b"\revent" not in event:
        return None   # no line can start with the field's name: skip the split (chat upstreams)
    name_value = None
    for name, value in _fields(event):
        if name == b"event":
            name_value = value
    return name_value


class WholeEvents:
    """Relay only complete SSE events; an incomplete one is held until its blank line.

    The gateway's own bytes (keep-alive, error event) then always land between two
    events, and a stream cut mid-event never shows the client half an event. Output is
    byte-identical to the input minus the events `keep` refuses (none here); the held
    rest goes out at EOF via `flush`. A chunk that is exactly whole, kept events is
    returned as the same object. An oversized event switches to plain pass-through.

    After each `feed` / `flush`, `events` holds the complete events it split (kept or
    not), or None while passing bytes through, so that the usage meter reads the same
    split instead of splitting the stream a second time (`Meter.feed_events`).
    """

    __slots__ = ("_splitter", "events")

    # Whether `keep` can refuse anything (subclasses that filter say so): this class
    # keeps every event without a call per event.
    FILTERS = False

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self._splitter: SSESplitter | None = SSESplitter(max_event_size)
        self.events: list[bytes] | None = []

    def keep(self, event: bytes) -> bool:
        return True

    def feed(self, chunk: bytes) -> bytes:
        splitter = self._splitter
        if splitter is None:
            self.events = None
            return chunk
        had_pending = splitter.buffered
        try:
            events = splitter.feed(chunk)
        except SSEEventTooLarge:
            self._splitter = None   # oversized event: plain pass-through from here on
            self.events = None
            return splitter.flush()
        self.events = events
        kept = [event for event in events if self.keep(event)] if self.FILTERS else events
        if len(kept) == len(events) and not had_pending and not splitter.buffered:
            return chunk
        return b"".join(kept)

    def flush(self) -> bytes:
        if self._splitter is None:
            self.events = None
            return b""
        rest = self._splitter.flush()
        self.events = [rest] if rest.strip() else []   # the last event, without its blank line
        return rest if not rest or self.keep(rest) else b""
