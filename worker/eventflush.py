"""Task events leave the worker with each batch's outcome, not at every turn of its loop.

Celery buffers a worker's task events and publishes what it holds at the next turn of
the event loop, one message per turn (``Consumer.on_send_event_buffered``). A scoring
worker sends three events per batch (``worker.events``) at different turns: about two
``PUBLISH`` commands per batch, each going through kombu's producer (declare, serialise,
encode the body, a round trip). On a 2-core Xeon that was 18 % of the worker's main
process (``docs/performance.md``, issue 12).

This consumer step publishes the buffer at most ``FLUSH_SECONDS`` after an event was
buffered, and ``worker.events`` publishes it when a batch's outcome is known: one
message per batch, carrying the received and started events of the batches handed to
the pool since. Each event keeps the time it was sent, so Flower's task times, runtimes
and rates are unchanged; a batch handed to the pool shows in Flower up to
``FLUSH_SECONDS`` later. Celery still publishes at once when ``BUFFER_LIMIT`` events
have gathered. When the consumer stops (shutdown, or a lost connection), the buffer is
published first; on a lost connection Celery keeps the unsent events and sends them on
the new one.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25  # Flower sees an event at most this late
BUFFER_LIMIT = 96  # events that make Celery publish at once (Celery's default: 24)


class CoalescedTaskEvents(bootsteps.StartStopStep):
    """Publish the worker's buffered task events within ``FLUSH_SECONDS`` (a consumer
    step); a batch's outcome publishes them sooner (``worker.events``)."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer: Any = None  # the pending flush, on the consumer's event loop

    def start(self, c: Any) -> None:
        """Take over the dispatcher's "events were buffered" hook (event loop only)."""
        dispatcher = c.event_dispatcher
        if c.hub is None or dispatcher is None or dispatcher.on_send_buffered is None:
            return  # no event loop: Celery publishes each event as it is sent
        dispatcher.buffer_limit = BUFFER_LIMIT

        def flush() -> None:
            self._timer = None
            # Celery publishes each group's list even when it is empty: after a batch's
            # outcome published the buffer (worker.events), there may be nothing left.
            if any(dispatcher._group_buffer.values()):
                c._flush_events()

        def buffered() -> None:
            if self._timer is None:
                self._timer = c.hub.call_later(FLUSH_SECONDS, flush)

        dispatcher.on_send_buffered = buffered

    def stop(self, c: Any) -> None:
        """Publish what is buffered now (best effort: the connection may be gone)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if c.event_dispatcher is None:
            return
        try:
            c._flush_events()
        except Exception as exc:  # kept by Celery for the next connection, or lost
            log.debug("task events not published at stop: %s", exc)

    def shutdown(self, c: Any) -> None:
        """As :meth:`stop`."""
        self.stop(c)
