"""The project's Celery app on kombu's own Redis transport, for ``bench.tune`` only.

``celery -A bench.plainkombu worker -Q score`` runs exactly ``celery -A worker``, except
that ``redis://`` goes back to kombu's stock transport (one BRPOP per message) instead
of ``worker.redis_transport`` (a batch's worth per round trip): the tuning table shows
what that transport buys. Importing this module changes the alias in this process only.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

from worker.celery import app

TRANSPORT_ALIASES.update(
    redis="kombu.transport.redis:Transport", rediss="kombu.transport.redis:Transport"
)

__all__ = ["app"]
