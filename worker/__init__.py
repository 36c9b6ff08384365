"""genderscore worker: the Celery app, settings, key schema and scoring runtime.

``celery -A worker`` loads ``worker.celery:app``. Importing this package never imports
TensorFlow (it is not fork-safe); models load lazily in each pool process.
"""

from worker.celery import app

__all__ = ["app"]
