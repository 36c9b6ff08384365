"""genderscore producer: scan pictures, enqueue runs, follow them, collect CSVs (no TensorFlow)."""
