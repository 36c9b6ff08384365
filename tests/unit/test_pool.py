"""The pool's count of the jobs each process holds (worker.pool.JobsInHand): which
process Celery's fair strategy may write the next batch to."""

from __future__ import annotations

from worker.pool import JobsInHand


def test_the_emptiest_process_gets_the_next_batch_up_to_the_depth() -> None:
    inqueues = {3, 5}
    busy = JobsInHand(2, inqueues)
    assert 3 not in busy and 5 not in busy and len(busy) == 0
    busy.add(3)  # 3 scores a batch: 5, idle, must get the next one
    assert 3 in busy and 5 not in busy
    busy.add(5)
    assert 3 not in busy and 5 not in busy  # each may take its next batch
    busy.add(3)
    assert 3 in busy and 5 not in busy and len(busy) == 1
    busy.add(5)
    assert 3 in busy and 5 in busy and len(busy) == 2  # both full: nothing is written
    busy.done(3)
    assert 3 not in busy and 5 in busy and len(busy) == 1


def test_a_process_that_is_gone_holds_nothing_and_blocks_nobody() -> None:
    inqueues = {3, 5}
    busy = JobsInHand(2, inqueues)
    for fd in (3, 3, 5):
        busy.add(fd)
    busy.discard(3)  # its queues closed (the process died)
    inqueues.discard(3)
    assert 3 not in busy and 5 not in busy and len(busy) == 0
    busy.done(5)
    busy.done(5)  # a late READY after the count reached zero stays at zero
    busy.add(5)
    assert 5 not in busy


def test_depth_one_is_celerys_fair_scheduling() -> None:
    busy = JobsInHand(1, {3, 5})
    busy.add(3)
    assert 3 in busy and 5 not in busy
    busy.done(3)
    assert 3 not in busy
    busy.add(3)
    busy.clear()
    assert 3 not in busy and len(busy) == 0
