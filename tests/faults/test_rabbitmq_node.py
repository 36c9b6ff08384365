"""The RabbitMQ the tests use: the session URL, and a private node that keeps its data.

Broker tests stop and restart ``tests.brokers.RabbitNode`` to simulate restarts and
outages; this pins that a restarted node (clean stop, and kill -9) still has a quorum
queue's confirmed messages, and that a virtual host and user made on it work.
"""

from __future__ import annotations

import time
from pathlib import Path

import kombu
import pytest

from tests.brokers import RabbitNode, amqp_answers, private_rabbitmq

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]


def _quorum_queue(name: str) -> kombu.Queue:
    return kombu.Queue(
        name, kombu.Exchange(name, "direct"), name, queue_arguments={"x-queue-type": "quorum"}
    )


def _publish(url: str, queue: kombu.Queue, bodies: list[dict[str, int]]) -> None:
    # Publisher confirms: publish() returns once the broker has the message on disk.
    with kombu.Connection(url, transport_options={"confirm_publish": True}) as conn:
        producer = conn.Producer(serializer="json")
        for body in bodies:
            producer.publish(
                body,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                delivery_mode=2,
                retry=False,
            )


def _drain(url: str, queue: kombu.Queue) -> list[dict[str, int]]:
    got: list[dict[str, int]] = []
    with kombu.Connection(url) as conn:
        bound = queue(conn.default_channel)
        while (message := bound.get(no_ack=False)) is not None:
            got.append(message.decode())
            message.ack()
    return got


def test_private_node_keeps_quorum_queue_messages_across_restarts(tmp_path: Path) -> None:
    node = RabbitNode(tmp_path / "rabbit")
    boot = node.start()
    try:
        url = node.add_vhost_user("gs-test", "gs-user", "s3cret/pw")
        queue = _quorum_queue("restart-check")
        _publish(url, queue, [{"n": n} for n in range(100)])

        node.stop()  # a clean shutdown
        assert not amqp_answers(url, timeout=1)
        reboot = node.start()
        _publish(url, queue, [{"n": n} for n in range(100, 150)])

        node.stop(kill=True)  # kill -9 of the whole VM: confirmed messages are on disk
        assert not amqp_answers(url, timeout=1)
        node.start()
        got = _drain(url, queue)
    finally:
        node.stop()
    assert sorted(m["n"] for m in got) == list(range(150))
    print(f"private RabbitMQ node: first boot {boot:.1f} s, restart {reboot:.1f} s")


def test_private_node_user_is_confined_to_its_vhost(tmp_path: Path) -> None:
    with private_rabbitmq(tmp_path / "rabbit") as node:
        url = node.add_vhost_user("only-here", "confined", "pw")
        assert amqp_answers(url)
        other = url.rsplit("/", 1)[0] + "/%2F"
        assert not amqp_answers(other), "a user of one vhost could open the default one"
        assert node.running
    assert not node.running
    deadline = time.monotonic() + 5
    while amqp_answers(node.url, timeout=1) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not amqp_answers(node.url, timeout=1)


def test_session_rabbitmq_round_trip(rabbitmq_url: str) -> None:
    queue = kombu.Queue("gs-session-check", durable=False, auto_delete=True)
    with kombu.Connection(rabbitmq_url) as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        conn.Producer(serializer="json").publish({"hello": 1}, routing_key=queue.name)
        deadline = time.monotonic() + 10
        while (message := bound.get(no_ack=True)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert message is not None and message.decode() == {"hello": 1}
