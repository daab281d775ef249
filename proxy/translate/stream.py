"""The stream translator: upstream bytes in, client bytes out, one pass.

    upstream bytes → SSE split → upstream decoder → hub events → [sequencer] → client encoder → bytes

Each `feed` returns at once what the upstream bytes so far decide; nothing waits for
the end of the stream. What is held is only what a grammar forces: an SSE event
until its blank line, a parallel tool call's deltas while another block is open
(sequence.py), a Gemini call's arguments until the call is whole (gemini.py).

The relay in the forwarder uses it like its other relays (`feed`, `flush`, `events`);
`events` is the upstream SSE split of the last feed, so the upstream's usage meter
reads the same split instead of splitting the stream a second time.
"""

from __future__ import annotations

from typing import Protocol

from proxy.errors import ProxyError
from proxy.metering.sse import SSEEventTooLarge, SSESplitter, event_data, event_name
from proxy.translate.hub import BlockStart, End, Event, Failure, ToolCall
from proxy.translate.sequence import Sequencer


class Decoder(Protocol):
    def feed(self, name: bytes | None, data: bytes) -> list[Event]: ...
    def close(self) -> list[Event]: ...


class Encoder(Protocol):
    def encode(self, ev: Event) -> bytes: ...
    def failure(self, status: int, message: str) -> bytes: ...


class StreamTranslator:
    def __init__(self, decoder: Decoder, encoder: Encoder, sequential: bool, names: dict[str, str] | None = None,
                 content_type: str = "text/event-stream") -> None:
        self._splitter = SSESplitter()
        self._decoder = decoder
        self._encoder = encoder
        self._sequencer = Sequencer() if sequential else None
        self._names = names or None   # upstream tool name → the client's (names.py)
        self._failed = False
        self._ended = False           # a terminal event (the end, or an error) went out
        self.events: list[bytes] = []
        # The caller's framing, whatever the upstream's (a Gemini caller without alt=sse reads
        # one JSON array, written element by element).
        self.content_type = content_type

    def feed(self, chunk: bytes) -> bytes:
        if self._failed:
            self.events = []
            return b""
        try:
            self.events = self._splitter.feed(chunk)
        except SSEEventTooLarge:
            self.events = []
            return self._fail("The upstream sent an event too large to translate.")
        return self._translate(self.events)

    def flush(self) -> bytes:
        """At upstream EOF: the unterminated last event, then the decoder's verdict (a
        stream that ended before its end marker becomes the client's error event)."""
        if self._failed:
            self.events = []
            return b""
        rest = self._splitter.flush()
        self.events = [rest] if rest.strip() else []
        out = self._translate(self.events)
        return out + self._emit(self._decoder.close())

    def _translate(self, events: list[bytes]) -> bytes:
        out = []
        for raw in events:
            data = event_data(raw)
            if data is None:
                continue   # comments, keep-alives, bare event lines
            out.append(self._emit(self._decoder.feed(event_name(raw), data)))
        return b"".join(out)

    def _emit(self, hub: list[Event]) -> bytes:
        if not hub:
            return b""
        out = []
        for ev in hub:
            if self._names is not None and isinstance(ev, BlockStart) and isinstance(ev.part, ToolCall):
                ev.part.name = self._names.get(ev.part.name, ev.part.name)
            for item in self._sequencer.feed(ev) if self._sequencer is not None else (ev,):
                out.append(self._encoder.encode(item))
                if isinstance(item, End):
                    self._ended = True
                elif isinstance(item, Failure):
                    self._failed = self._ended = True
                    return b"".join(out)
        return b"".join(out)

    def _fail(self, message: str) -> bytes:
        self._failed = self._ended = True
        return self._encoder.failure(502, message)

    def stream_error_event(self, err: ProxyError, request_id: str) -> bytes:
        """The gateway's own mid-stream error (a timeout, a cut connection, a shutdown) in
        the caller's framing, closing what the stream opened (a Gemini JSON array included);
        nothing once the stream has ended."""
        if self._ended or self._failed:
            return b""
        self._failed = self._ended = True
        return self._encoder.failure(err.status, err.message)
