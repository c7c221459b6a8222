"""Wake SSE streams when a run's stream grows: a per-run asyncio.Event, replaced on every notify.

`notify` may be called from any thread (sync routes run in a thread pool, the supervisor has its
own); it hops onto the event loop. A stream takes `hub.event(run_id)` *before* reading the
database and then waits on it, so a notify that lands between the read and the wait is not lost.
"""

from __future__ import annotations

import asyncio


class Hub:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def event(self, run_id: str) -> asyncio.Event:
        """The event the next notify for `run_id` sets (call on the loop)."""
        ev = self._events.get(run_id)
        if ev is None:
            ev = self._events[run_id] = asyncio.Event()
        return ev

    def _fire(self, run_id: str) -> None:
        ev = self._events.pop(run_id, None)
        if ev is not None:
            ev.set()

    def notify(self, run_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._fire(run_id)
        else:
            loop.call_soon_threadsafe(self._fire, run_id)
