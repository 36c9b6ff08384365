"""Training task (being written)."""
