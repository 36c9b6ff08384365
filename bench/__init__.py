"""The genderscore benchmark: ``python -m bench.run`` (see docs/performance.md).

Nothing here is imported by ``worker``, ``producer`` or ``training``; ``bench`` imports
them, never ``tests``.
"""
