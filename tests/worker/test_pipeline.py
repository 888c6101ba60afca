"""``in_background``: a generator run by a thread, bounded, with errors and early exits passed on."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator

import pytest

from worker.pipeline import in_background


def test_items_arrive_in_order_from_another_thread() -> None:
    producers: list[str] = []

    def produce() -> Iterator[int]:
        for item in range(100):
            producers.append(threading.current_thread().name)
            yield item

    assert list(in_background(produce(), name="bertbatch-test")) == list(range(100))
    assert set(producers) == {"bertbatch-test"}


def test_the_producer_runs_at_most_depth_items_ahead() -> None:
    produced = 0

    def endless() -> Iterator[int]:
        nonlocal produced
        while True:
            produced += 1
            yield produced

    items = in_background(endless(), depth=3)
    assert next(items) == 1
    time.sleep(0.3)  # time enough to run far ahead, were it unbounded
    # The first item, three waiting in the buffer, one in the producer's hand.
    assert produced <= 1 + 3 + 1
    items.close()


def test_a_producer_error_is_raised_in_the_consumer_after_the_items_before_it() -> None:
    def fails_at_three() -> Iterator[int]:
        yield 1
        yield 2
        raise KeyError("bad row")

    got = []
    with pytest.raises(KeyError, match="bad row"):
        for item in in_background(fails_at_three()):
            got.append(item)
    assert got == [1, 2]


def test_closing_the_consumer_stops_the_thread_and_closes_the_producer() -> None:
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            while True:
                yield 0
        finally:
            closed.set()

    items = in_background(endless(), name="bertbatch-closing")
    next(items)
    items.close()
    assert closed.is_set()  # close() joins the thread, which closed the producer first
    assert "bertbatch-closing" not in [thread.name for thread in threading.enumerate()]


def test_chained_stages_all_stop_when_the_last_is_closed() -> None:
    upstream_closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from range(10**9)
        finally:
            upstream_closed.set()

    def doubled(items: Generator[int, None, None]) -> Iterator[int]:
        try:
            for item in items:
                yield 2 * item
        finally:
            items.close()  # as the local engine's run stage does: stop and join the stage above

    second = in_background(doubled(in_background(source(), name="bertbatch-first")), name="bertbatch-second")
    assert [next(second), next(second)] == [0, 2]
    second.close()
    assert upstream_closed.is_set()
    assert not [thread.name for thread in threading.enumerate() if thread.name in ("bertbatch-first", "bertbatch-second")]
