"""One block at a time: for client dialects whose streams cannot interleave blocks.

Chat upstreams may interleave the argument deltas of parallel tool calls (index 0,
1, 0...), and a Gemini or chat decoder may open a block while another is still open.
Anthropic allows one open content block at a time (P9), and Codex handles Responses
output items best strictly nested. The sequencer passes events of the open block
through at once and holds those of any other block until the open one stops; then the
held block's events follow in order. It buffers nothing in the usual, sequential case.
"""

from __future__ import annotations

from proxy.translate.hub import (
    BlockStart,
    BlockStop,
    Delta,
    End,
    Event,
    Failure,
    Signature,
)


class Sequencer:
    def __init__(self) -> None:
        self._open: int | None = None
        self._held: dict[int, list[Event]] = {}    # insertion-ordered: blocks in start order
        self._stopped: set[int] = set()

    def feed(self, ev: Event) -> list[Event]:
        if isinstance(ev, BlockStart):
            if self._open is None:
                self._open = ev.index
                return [ev]
            self._held[ev.index] = [ev]
            return []
        if isinstance(ev, (Delta, Signature)):
            if ev.index == self._open:
                return [ev]
            held = self._held.get(ev.index)
            if held is not None:
                held.append(ev)
            return []
        if isinstance(ev, BlockStop):
            if ev.index == self._open:
                self._open = None
                return [ev, *self._drain()]
            if ev.index in self._held:
                self._held[ev.index].append(ev)
                self._stopped.add(ev.index)
            return []
        if isinstance(ev, (End, Failure)):
            return [*self._close_all(), ev]
        return [ev]

    def _drain(self) -> list[Event]:
        out: list[Event] = []
        while self._held:
            index = next(iter(self._held))
            out.extend(self._held.pop(index))
            if index in self._stopped:
                self._stopped.discard(index)
                continue
            self._open = index
            break
        return out

    def _close_all(self) -> list[Event]:
        out: list[Event] = []
        while self._open is not None or self._held:
            if self._open is not None:
                out.append(BlockStop(self._open))
                self._open = None
            out.extend(self._drain())
        return out
