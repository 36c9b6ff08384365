"""genderscore worker: the Celery app, settings, key schema and scoring runtime.

``celery -A worker`` loads ``worker.celery:app`` (Celery looks for ``worker.celery``
when the package has no ``app``). Importing this package loads neither the app nor the
settings, so that every entry point can report an invalid environment in one line
(see ``worker.settings``); importing it never imports TensorFlow (it is not
fork-safe): models load lazily in each pool process.
"""
