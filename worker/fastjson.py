"""kombu's JSON decoding in half its time or less: orjson wherever it reads the same.

kombu reads every message body, and the Redis transport every queue entry, with the
standard library's decoder and a Python hook called for every object, to revive its
typed values (``{"__type__": ..., "__value__": ...}``: dates, decimals, UUIDs). That was
a tenth of the scoring worker's main process (``py-spy``, docs/performance.md).

``loads`` gives what kombu's ``loads`` gives. orjson reads a text only when it holds no
``"__type__"`` (nor any ``\\u`` escape, which could spell one), no run of 19 digits
(orjson reads an integer beyond 64 bits as a float) and nothing orjson refuses; anything
else is kombu's, and so is its error. ``use_for_messages`` makes it the decoder of
kombu's ``json`` serializer (the one Celery's messages and events use), in the process
that calls it.
"""

from __future__ import annotations

from typing import Any

import orjson
from kombu.serialization import register
from kombu.utils.json import dumps
from kombu.utils.json import loads as kombu_loads

_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """``raw`` decoded as kombu's ``kombu.utils.json.loads`` decodes it."""
    data: bytes | None = raw if isinstance(raw, bytes) else None
    if isinstance(raw, str) and raw.isascii():
        data = raw.encode("ascii")
    if (
        data is not None
        and b'"__type__"' not in data
        and b"\\u" not in data
        and b"0" * 19 not in data.translate(_DIGITS_AS_ZERO)
    ):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return kombu_loads(raw)


def use_for_messages() -> None:
    """Decode kombu's ``application/json`` content with ``loads`` (encoding unchanged)."""
    register("json", dumps, loads, content_type="application/json", content_encoding="utf-8")
