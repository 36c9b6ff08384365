"""The S3 identities of the Compose deployment, on a real SeaweedFS store.

``docker/setup-secrets.py`` writes the store's identities file (``s3.json``, mounted by
the ``s3`` service) and one AWS credentials file per client. Here a SeaweedFS store
runs with that very file, and each client reaches it as its container does: through
``AWS_SHARED_CREDENTIALS_FILE`` and ``AWS_ENDPOINT_URL`` only, no key in the
environment. The worker may read pictures and nothing else; the CLI may list and read;
the operator's admin identity uploads.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, jpeg_bytes, picture
from tests.integration.test_compose import own_ids, run_setup
from tests.servers import S3Store, s3_store

BUCKET = "profiles"
PREFIX = f"s3://{BUCKET}/image/"

# What each client does, as the product does it, in a process of its own whose only
# credentials are the file: the worker's fetch, the producer's listing, a plain upload.
PROBE = """
import sys
from producer.sources import list_source
from worker.fetch import Fetcher, FetchPolicy
from worker.preprocess import PictureError
from worker.s3 import s3_client
from worker.sources import PictureRef, PrefixSource, SourceError

source = PrefixSource(sys.argv[1])
outcome = {}
try:
    outcome["list"] = str(len(list_source(source, (".jpg",)).pictures))
except SourceError as exc:
    outcome["list"] = "refused" if "access denied" in str(exc) else f"error: {exc}"
fetcher = Fetcher(FetchPolicy.from_settings())
try:
    data = fetcher.fetch(source, PictureRef("u1", "u1.jpg"))
    outcome["read"] = "jpeg" if data[:3] == b"\\xff\\xd8\\xff" else "other"
except PictureError as exc:
    outcome["read"] = exc.kind
fetcher.close()
try:
    s3_client().put_object(Bucket="profiles", Key="image/new.jpg", Body=b"x")
    outcome["write"] = "written"
except Exception as exc:
    outcome["write"] = getattr(exc, "response", {}).get("Error", {}).get("Code", repr(exc))
print(" ".join(f"{k}={v}" for k, v in sorted(outcome.items())))
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployment folder with what setup-secrets.py writes."""
    root = tmp_path_factory.mktemp("deployment-s3")
    result = run_setup(root, **own_ids())
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="module")
def store(deployment: Path) -> Iterator[S3Store]:
    """SeaweedFS with the deployment's identities file, holding two pictures."""
    with s3_store(config=deployment / "secrets" / "s3.json") as running:
        fs = running.filesystem()  # the admin identity of the file
        fs.mkdir(BUCKET)
        for n in (1, 2):
            fs.pipe(f"{BUCKET}/image/u{n}.jpg", jpeg_bytes(picture("female", seed=n)))
        yield running


def probe(store: S3Store, credentials: Path) -> dict[str, str]:
    """The probe's outcomes, run with ``credentials`` as the only AWS configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_ENDPOINT_URL": store.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONPATH": str(ROOT),
        }
    )
    done = subprocess.run(
        [sys.executable, "-c", PROBE, PREFIX],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "aws_secret_access_key" not in done.stdout + done.stderr
    return dict(item.split("=", 1) for item in done.stdout.split())


def test_credentials_files_are_aws_profiles_of_the_store_identities(deployment: Path) -> None:
    secrets = deployment / "secrets"
    keys = {}
    for who in ("worker", "cli", "admin"):
        parser = configparser.ConfigParser()
        parser.read(secrets / f"aws-credentials-{who}")
        assert parser.sections() == ["default"], who
        keys[who] = parser["default"]["aws_access_key_id"]
        assert len(parser["default"]["aws_secret_access_key"]) == 48
        assert parser["default"]["aws_secret_access_key"] in (secrets / "s3.json").read_text()
    assert len(set(keys.values())) == 3


def test_the_worker_reads_pictures_and_nothing_else(store: S3Store, deployment: Path) -> None:
    outcome = probe(store, deployment / "secrets" / "aws-credentials-worker")
    assert outcome == {"list": "refused", "read": "jpeg", "write": "AccessDenied"}


def test_the_cli_lists_and_reads_and_writes_nothing(store: S3Store, deployment: Path) -> None:
    outcome = probe(store, deployment / "secrets" / "aws-credentials-cli")
    assert outcome == {"list": "2", "read": "jpeg", "write": "AccessDenied"}


def test_the_admin_uploads(store: S3Store, deployment: Path) -> None:
    outcome = probe(store, deployment / "secrets" / "aws-credentials-admin")
    assert outcome["write"] == "written" and outcome["read"] == "jpeg"
