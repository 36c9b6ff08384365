#!/usr/bin/env python3
"""Create the secrets of the Compose deployment: ``python3 docker/setup-secrets.py``.

Run it once on the Docker host, as the user who owns the data folders (not root), from
anywhere: it writes beside docker-compose.yml (``--root``). Python 3.8+, standard
library only. It creates:

    secrets/                      0700, random passwords (secrets.token_hex)
      redis.acl                   the Redis users, one per service (passwords hashed)
      redis-url-<service>         that service's GENDERSCORE_REDIS_URL, with its user
      redis-admin-password        the `admin` user's password, for the operator
      broker-url                  GENDERSCORE_BROKER_URL: RabbitMQ, user genderscore
      rabbitmq-definitions.json   RabbitMQ's user (password hashed), vhost, permissions
      flower-config.py            Flower's basic auth (read with --conf)
      s3.json                     the object store's identities (profile s3: SeaweedFS)
      aws-credentials-<who>       an AWS credentials file per S3 client: worker (read),
                                  cli (list and read), admin (everything: uploads)
      worker-host/                with --hosts-address: what a worker on another host
                                  needs (docs/deploy.md, "Workers on several hosts"):
        worker.env                its variables, for `docker run --env-file`
        secrets/                  GENDERSCORE_REDIS_URL, GENDERSCORE_BROKER_URL (to the
                                  address given) and aws-credentials (the worker's)
    .env                          GENDERSCORE_UID and GENDERSCORE_GID set (other lines kept)

Every file that holds a password is 0600 and belongs to GENDERSCORE_UID, the user the
genderscore containers run as: Compose bind-mounts secret files with their owner and
mode from the host (it ignores a secret's uid/gid/mode for files). The two files that
hold only hashes are 0644: the redis and rabbitmq images drop to their own user before
they read them. The folder's 0700 keeps the host's other users out of all of them.

GENDERSCORE_UID and GENDERSCORE_GID come from the environment, else from .env, else
from the user running this. 0 (root) is refused: the containers would run as root. Run as root, it
gives the files to GENDERSCORE_UID:GENDERSCORE_GID; run as anyone else, that must be
that user.

An existing secrets folder is left alone unless ``--force``, which writes new passwords
for everything (then ``docker compose up -d --force-recreate``).

Redis users (``~<prefix>:*``: the key prefix, GENDERSCORE_KEY_PREFIX, read from .env):
worker, beat, trainer and cli read and write the prefix's keys and channels; flower and
metrics only read them; each runs only the commands the service was seen to run
(tests/faults/test_compose_acl.py runs every service with this file and fails on any
refusal). ``default`` may only PING (the health check, no password); ``admin`` may do
anything (``docker compose exec`` with redis-admin-password, docs/deploy.md).

S3 identities (SeaweedFS's ``-s3.config``): ``worker`` may only read objects, ``cli``
may list and read (``genderscore score s3://...``), ``admin`` may do anything. S3's
signatures need the plain secret key on the server: s3.json is 0600, like the URLs (the
s3 service runs as GENDERSCORE_UID).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # where docker-compose.yml is
PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # GENDERSCORE_KEY_PREFIX's own rule

# Commands each service's Redis user may run, for either broker (Redis 7 names; `a|b` is
# subcommand b). Found by running each service with nothing allowed and adding what
# Redis' ACL log showed refused, until the whole pipeline ran without a refusal
# (tests/faults/test_compose_acl.py). One more from kombu's source: the trainer's
# `rpush`, which restores a training message left unacknowledged past its visibility
# timeout (7 days) on a Redis broker.
COMMANDS = {
    "worker": (
        "brpop del eval evalsha exec exists expire get hdel hexists hget hgetall hincrby "
        "hlen hmget hscan hset hsetnx hvals llen lpush lrange multi ping psubscribe "
        "publish rpop rpush sadd script|exists script|load set smembers srem time unwatch "
        "watch zadd zrange zrangebyscore zrem zrevrange"
    ),
    "beat": "exec llen lpush multi ping publish sadd",
    "trainer": (
        "brpop del evalsha exec expire get hdel hget hset llen lpush multi ping "
        "psubscribe publish rpop rpush sadd script|exists set setex smembers srem time "
        "unwatch watch zadd zrange zrangebyscore zrem"
    ),
    "cli": (
        "brpop del eval evalsha exec exists expire get hdel hexists hget hgetall hlen hmget "
        "hscan hset hsetnx llen lpush lrange multi ping publish sadd script|exists "
        "script|load set srem subscribe time unsubscribe zadd zrange zrangebyscore zrem "
        "zrevrange"
    ),
    "flower": (
        "brpop del evalsha exec get llen multi ping psubscribe publish punsubscribe sadd "
        "script|exists set srem time zadd zrange zrangebyscore"
    ),
    "metrics": "exists get hgetall hlen llen ping zrevrange",
}
# Patterns that kombu's Redis transport PSUBSCRIBEs to (Redis broker): Redis compares a
# pattern literally with the user's channel rules, so each is allowed as itself.
PATTERNS = {
    "worker": "/0.celery.pidbox",
    "beat": "",
    "trainer": "/0.celery.pidbox",
    "cli": "",
    "flower": "/0.celeryev/*",
    "metrics": "",
}
# Keys Flower writes (Redis broker only): kombu's bindings, its event queue and its
# replies to remote control. Data keys stay read-only. (Flower cannot restore messages
# left unacknowledged past the visibility timeout: the workers do.)
WRITES = {
    "flower": (
        "*.reply.celery.pidbox* _kombu.binding.celeryev "
        "_kombu.binding.reply.celery.pidbox _kombu.binding_deadlines "
        "_kombu.binding_permanent.celeryev _kombu.binding_permanent.reply.celery.pidbox "
        "celeryev.* unacked_mutex"
    ),
    "metrics": "",
}
READ_WRITE = ("worker", "beat", "trainer", "cli")
READ_ONLY = ("flower", "metrics")
# S3 identities: name -> SeaweedFS actions (docker-compose.yml's s3 service).
S3_ACTIONS = {
    "worker": ["Read"],
    "cli": ["Read", "List"],
    "admin": ["Admin", "Read", "Write", "List", "Tagging"],
}
S3_PORT = 8333
RABBITMQ_USER = "genderscore"
RABBITMQ_VHOST = "genderscore"


class Refused(Exception):
    """The setup cannot go on; the message says why and what to do."""


def redis_user(name: str, password: str, prefix: str) -> str:
    """One line of the ACL file for a service's user."""
    keys = f"~{prefix}:*"
    if name not in READ_WRITE:
        keys = " ".join([f"%R~{prefix}:*", *(f"~{prefix}:{k}" for k in WRITES[name].split())])
    commands = " ".join(f"+{c}" for c in COMMANDS[name].split())
    channels = " ".join(f"&{prefix}:{p}" for p in ["*", *PATTERNS[name].split()])
    sha = hashlib.sha256(password.encode()).hexdigest()
    return f"user {name} on #{sha} resetkeys resetchannels {keys} {channels} -@all {commands}"


def acl_file(passwords: dict[str, str], prefix: str) -> str:
    """The Redis ACL file: default (PING only), admin, one user per service."""
    admin = hashlib.sha256(passwords["admin"].encode()).hexdigest()
    lines = [
        "user default on nopass resetkeys resetchannels -@all +ping",
        f"user admin on #{admin} ~* &* +@all",
        *(redis_user(name, passwords[name], prefix) for name in COMMANDS),
    ]
    return "\n".join(lines) + "\n"


def rabbitmq_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def rabbitmq_definitions(password: str) -> str:
    """The user, virtual host and permissions RabbitMQ imports at boot."""
    definitions = {
        "users": [
            {
                "name": RABBITMQ_USER,
                "password_hash": rabbitmq_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
        ],
        "vhosts": [{"name": RABBITMQ_VHOST}],
        "permissions": [
            {
                "user": RABBITMQ_USER,
                "vhost": RABBITMQ_VHOST,
                "configure": ".*",
                "write": ".*",
                "read": ".*",
            }
        ],
    }
    return json.dumps(definitions, indent=2) + "\n"


def s3_keys() -> dict[str, tuple[str, str]]:
    """A fresh access key id and secret key per S3 identity."""
    return {
        name: (f"genderscore-{name}-{secrets.token_hex(4)}", secrets.token_hex(24))
        for name in S3_ACTIONS
    }


def s3_config(keys: dict[str, tuple[str, str]]) -> str:
    """SeaweedFS's S3 identities file: each identity's key and what it may do."""
    identities = [
        {
            "name": name,
            "credentials": [{"accessKey": keys[name][0], "secretKey": keys[name][1]}],
            "actions": actions,
        }
        for name, actions in S3_ACTIONS.items()
    ]
    return json.dumps({"identities": identities}, indent=2) + "\n"


def aws_credentials(key: tuple[str, str]) -> str:
    """An AWS shared credentials file (AWS_SHARED_CREDENTIALS_FILE) with one profile."""
    return f"[default]\naws_access_key_id = {key[0]}\naws_secret_access_key = {key[1]}\n"


def worker_env(address: str, prefix: str) -> str:
    """worker.env of the worker-host bundle: the variables of a worker on another host."""
    lines = [
        "# `docker run --env-file worker.env`: a genderscore worker on another host",
        "# (docs/deploy.md). The passwords are in secrets/, mounted at /run/secrets.",
        "GENDERSCORE_SECRETS_DIR=/run/secrets",
        f"GENDERSCORE_KEY_PREFIX={prefix}",
        "GENDERSCORE_MODEL=/data/models/gender.h5",
        f"AWS_ENDPOINT_URL=http://{address}:{S3_PORT}",
        "AWS_DEFAULT_REGION=us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE=/run/secrets/aws-credentials",
    ]
    return "\n".join(lines) + "\n"


def read_env(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of a .env file (no quotes or expansion: ours are plain)."""
    found: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.lstrip().startswith("#"):
                found[name.strip()] = value.strip()
    return found


def write_env(path: Path, values: dict[str, str]) -> None:
    """Set ``values`` in a .env file, keeping its other lines."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.partition("=")[0].strip() not in values]
    kept += [f"{name}={value}" for name, value in values.items()]
    write_file(path, "\n".join(kept) + "\n", 0o600)


def write_file(path: Path, text: str, mode: int) -> None:
    """Write ``text`` with ``mode`` from the start (never readable by others meanwhile)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, mode)  # whatever the umask took away
    os.replace(tmp, path)


def owner(env: dict[str, str]) -> tuple[int, int]:
    """GENDERSCORE_UID and GID: the environment's, else this user's; never 0."""
    ids = []
    for name, mine in (("GENDERSCORE_UID", os.getuid()), ("GENDERSCORE_GID", os.getgid())):
        value = os.environ.get(name) or env.get(name) or str(mine)
        if not value.isdigit():
            raise Refused(f"{name}={value!r} is not a number")
        if int(value) == 0:
            raise Refused(
                f"{name} is 0 (root): the containers would run as root. Run this as the "
                f"user who owns the data folders, or set {name} to that user's id "
                f"(e.g. {name}=10001 with folders owned by 10001:10001)"
            )
        ids.append(int(value))
    uid, gid = ids
    if os.getuid() != 0 and uid != os.getuid():
        raise Refused(
            f"GENDERSCORE_UID is {uid} but you are uid {os.getuid()}: the secret files "
            "would be yours, and the containers could not read them. Run this as that "
            "user (or as root, which gives them to it)"
        )
    return uid, gid


def main(argv: list[str] | None = None) -> int:
    """Write the secrets; 0 when done, 2 when refused (one line on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="docker-compose.yml's folder")
    parser.add_argument("--flower-user", default="ops", help="Flower's basic-auth user")
    parser.add_argument("--redis-host", default="redis:6379", help="host:port in the URLs")
    parser.add_argument("--rabbitmq-host", default="rabbitmq:5672", help="host:port")
    parser.add_argument(
        "--hosts-address",
        help="this host's private address (HOSTS_BIND): also write worker-host/, what a "
        "worker on another host needs",
    )
    parser.add_argument("--force", action="store_true", help="replace existing secrets")
    args = parser.parse_args(argv)
    root: Path = args.root
    folder, env_path = root / "secrets", root / ".env"
    try:
        if not root.is_dir():
            raise Refused(f"{root} is not a folder: --root names docker-compose.yml's folder")
        env = read_env(env_path)
        uid, gid = owner(env)
        prefix = os.environ.get("GENDERSCORE_KEY_PREFIX") or env.get(
            "GENDERSCORE_KEY_PREFIX", "genderscore"
        )
        if not PREFIX_RE.fullmatch(prefix):
            raise Refused(f"GENDERSCORE_KEY_PREFIX={prefix!r}: expected [A-Za-z0-9_.-]{{1,32}}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", args.flower_user):
            raise Refused(f"--flower-user {args.flower_user!r}: expected [A-Za-z0-9_.-]{{1,32}}")
        address = args.hosts_address
        if address is not None and not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", address):
            raise Refused(f"--hosts-address {address!r}: expected a host name or an address")
        if folder.exists() and any(folder.iterdir()) and not args.force:
            raise Refused(f"{folder} exists: --force writes new passwords for everything")
    except Refused as exc:
        sys.stderr.write(f"setup-secrets: {exc}\n")
        return 2
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    passwords = {name: secrets.token_hex(24) for name in ("admin", "rabbitmq", *COMMANDS)}
    files: dict[str, tuple[str, int]] = {
        "redis.acl": (acl_file(passwords, prefix), 0o644),
        "redis-admin-password": (passwords["admin"] + "\n", 0o600),
        "broker-url": (
            f"amqp://{RABBITMQ_USER}:{passwords['rabbitmq']}@{args.rabbitmq_host}/"
            f"{RABBITMQ_VHOST}\n",
            0o600,
        ),
        "rabbitmq-definitions.json": (rabbitmq_definitions(passwords["rabbitmq"]), 0o644),
        "flower-config.py": (
            "# Flower's options (docker/setup-secrets.py), read with --conf.\n"
            f"basic_auth = [{args.flower_user + ':' + secrets.token_hex(16)!r}]\n",
            0o600,
        ),
    }
    for name in COMMANDS:
        url = f"redis://{name}:{passwords[name]}@{args.redis_host}/0\n"
        files[f"redis-url-{name}"] = (url, 0o600)
    keys = s3_keys()
    files["s3.json"] = (s3_config(keys), 0o600)
    for name in S3_ACTIONS:
        files[f"aws-credentials-{name}"] = (aws_credentials(keys[name]), 0o600)
    if address is None and (folder / "worker-host").exists():
        shutil.rmtree(folder / "worker-host")  # its passwords are the old ones
    if address is not None:
        host = f"[{address}]" if ":" in address else address
        bundle = "worker-host/secrets/"
        files[bundle + "GENDERSCORE_REDIS_URL"] = (
            f"redis://worker:{passwords['worker']}@{host}:6379/0\n",
            0o600,
        )
        files[bundle + "GENDERSCORE_BROKER_URL"] = (
            f"amqp://{RABBITMQ_USER}:{passwords['rabbitmq']}@{host}:5672/{RABBITMQ_VHOST}\n",
            0o600,
        )
        files[bundle + "aws-credentials"] = (aws_credentials(keys["worker"]), 0o600)
        files["worker-host/worker.env"] = (worker_env(host, prefix), 0o644)
        for sub in ("worker-host", "worker-host/secrets"):
            (folder / sub).mkdir(mode=0o700, exist_ok=True)
            os.chmod(folder / sub, 0o700)
    for name, (text, mode) in files.items():
        write_file(folder / name, text, mode)
    write_env(env_path, {"GENDERSCORE_UID": str(uid), "GENDERSCORE_GID": str(gid)})
    if os.getuid() == 0:
        subfolders = [folder / "worker-host", folder / "worker-host" / "secrets"]
        made = [path for path in subfolders if path.is_dir()]
        for path in (folder, *made, env_path, *(folder / name for name in files)):
            os.chown(path, uid, gid)
    sys.stdout.write(
        f"wrote {len(files)} files in {folder} and GENDERSCORE_UID={uid}, "
        f"GENDERSCORE_GID={gid} in {env_path}; Redis users for the key prefix {prefix!r}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
