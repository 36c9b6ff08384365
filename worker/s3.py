"""S3 through botocore: the one client factory of the producer's listing and the fetcher.

Credentials, endpoint and region come from botocore's standard chain, on every host:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3) for S3 clones, AWS_PROFILE and the ~/.aws files, instance roles.
Nothing of them is ever put in a message, a log line or Redis.

botocore reads every timestamp of a response with dateutil: three quarters of the CPU
time of listing 1,000 keys (cProfile, bench/sources.py). The clients made here read
ISO 8601 and HTTP dates with the standard library instead.
"""

from __future__ import annotations

import logging
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

# At DEBUG these libraries log request lines with their query strings (a presigned
# URL's signature, a manifest's signed URL) and signed headers (an access key id):
# capped at INFO unless an operator set their level on purpose. Every module that
# sends such a request imports this one.
for _name in ("urllib3.connectionpool", "botocore", "aiobotocore", "s3fs"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)


def parse_time(value: str) -> datetime:
    """An S3 timestamp: ISO 8601 in listings, an HTTP date in headers."""
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        pass
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError):
        from botocore.utils import parse_timestamp

        parsed: datetime = parse_timestamp(value)  # epoch numbers and other oddities
        return parsed


def s3_client(timeout: float = 30.0, connections: int = 10) -> Any:
    """A botocore S3 client of the standard chain; botocore's own retries off (callers
    retry with their own classification), ``timeout`` for connect and each read."""
    import botocore.config
    import botocore.session

    session = botocore.session.get_session()
    factory = session.get_component("response_parser_factory")
    factory.set_parser_defaults(timestamp_parser=parse_time)
    config = botocore.config.Config(
        signature_version="s3v4",
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"mode": "standard", "total_max_attempts": 1},
        max_pool_connections=connections,
    )
    return session.create_client("s3", config=config)


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    bucket, _, key = url.split("://", 1)[1].partition("/")
    return bucket, key
