"""Nightly scoring of new profiles (Celery beat) -- placeholder until issue 6."""
