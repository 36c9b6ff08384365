"""Integration tests: a real Redis and real Celery worker processes."""
