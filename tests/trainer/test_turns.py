"""Turns: the threads of a sweep run one at a time, in order, skipping those that finished;
a failure stops the others."""

import threading

import pytest

from mlsae.trainer.turns import SharedBatches, SweepAborted, Turns


def run_threads(turns: Turns, rounds: list[int], fail_at: tuple[int, int] | None = None):
    order: list[tuple[int, int]] = []
    outcomes: list[BaseException | None] = [None] * turns.n

    def work(i: int) -> None:
        try:
            turns.take(i)
            for r in range(rounds[i]):
                if r:
                    turns.give(i)
                    turns.take(i)
                order.append((i, r))
                if fail_at == (i, r):
                    raise RuntimeError("boom")
            turns.finish(i)
        except BaseException as error:
            outcomes[i] = error
            turns.finish(i, error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(turns.n)]
    for thread in reversed(threads):  # started out of order: the turns still decide
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
    return order, outcomes


def test_threads_take_turns_in_order_and_skip_those_that_finished():
    order, outcomes = run_threads(Turns(3), rounds=[3, 1, 3])
    assert order == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2), (2, 2)]
    assert outcomes == [None, None, None]


def test_a_failure_stops_the_other_threads():
    order, outcomes = run_threads(Turns(3), rounds=[3, 3, 3], fail_at=(1, 1))
    assert order == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]
    assert isinstance(outcomes[1], RuntimeError)
    assert isinstance(outcomes[0], SweepAborted) and isinstance(outcomes[2], SweepAborted)


@pytest.mark.parametrize("readers", [1, 3])
def test_shared_batches_reads_the_loader_once(readers):
    reads = []

    class Loader:
        def __iter__(self):
            for item in range(4):
                reads.append(item)
                yield item

    shared = SharedBatches(Loader(), readers)
    views = [shared.view(i) for i in range(readers)]
    iterators = [iter(view) for view in views]
    seen = [[next(it) for it in iterators] for _ in range(4)]
    assert seen == [[item] * readers for item in range(4)]
    assert reads == [0, 1, 2, 3]
    assert all(next(it, None) is None for it in iterators)
