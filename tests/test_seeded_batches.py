"""Training batches as a function of the seed: independent of the workers, sharded, resumed, cleaned up."""
import os
import signal

import numpy as np
import pytest

from dorefanet.model import lr_steps
from dorefanet.seeded_batches import DataWorkerError, SeededBatches, batch_rng, pass_order


class Noisy:
    """A batch of the examples' ids plus one draw from the batch's stream per example."""

    def __call__(self, indices, rng):
        return [np.asarray(indices), rng.uniform(size=len(indices))]


class Failing:
    def __call__(self, indices, rng):
        if 7 in indices:
            raise ValueError("example 7 is bad")
        return [np.asarray(indices)]


class Dying:
    def __call__(self, indices, rng):
        os.kill(os.getpid(), signal.SIGKILL)


def draw(flow, passes):
    flow.reset_state()
    try:
        return [[b.copy() for b in batch] for _ in range(passes) for batch in flow]
    finally:
        flow.close()


def same(a, b):
    return len(a) == len(b) and all(all(np.array_equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


def test_batches_do_not_depend_on_the_workers_and_each_pass_is_a_new_order():
    runs = [draw(SeededBatches(50, 8, Noisy(), seed=5, workers=w), passes=3) for w in (0, 1, 3)]
    assert same(runs[0], runs[1]) and same(runs[0], runs[2])
    assert len(runs[0]) == 3 * 6   # 50 // 8 batches a pass, the partial one dropped
    first, second = np.concatenate([b[0] for b in runs[0][:6]]), np.concatenate([b[0] for b in runs[0][6:12]])
    assert len(set(first.tolist())) == 48 and not np.array_equal(first, second)
    assert np.array_equal(np.sort(first), np.sort(pass_order(5, 0, 50)[:48]))
    other = draw(SeededBatches(50, 8, Noisy(), seed=6, workers=0), passes=1)
    assert not same(runs[0][:6], other)


def test_a_batch_is_its_own_stream():
    a, b = batch_rng(1, 0, 3).uniform(size=4), batch_rng(1, 0, 3).uniform(size=4)
    assert np.array_equal(a, b)
    for other in (batch_rng(2, 0, 3), batch_rng(1, 1, 3), batch_rng(1, 0, 4)):
        assert not np.array_equal(a, other.uniform(size=4))


def test_shards_split_the_one_stream_and_start_at_resumes_it():
    whole = draw(SeededBatches(64, 4, Noisy(), seed=1, workers=0), passes=2)
    shards = []
    for index in range(2):
        flow = SeededBatches(64, 4, Noisy(), seed=1, workers=2)
        flow.shard(index, 2)
        assert len(flow) == 8
        shards.append(draw(flow, passes=2))
    assert same(shards[0], whole[0::2]) and same(shards[1], whole[1::2])
    resumed = SeededBatches(64, 4, Noisy(), seed=1, workers=2)
    resumed.start_at(21)   # pass 1, batch 5
    assert same(draw(resumed, passes=1), whole[21:32])


def test_an_abandoned_pass_does_not_leak_into_the_next():
    flow = SeededBatches(40, 4, Noisy(), seed=2, workers=2)
    flow.reset_state()
    try:
        first = iter(flow)
        next(first)
        next(first)   # four more batches are in flight
        second = [b[0] for b in flow]
    finally:
        flow.close()
    expected = [b[0] for b in draw(SeededBatches(40, 4, Noisy(), seed=2, workers=0), passes=2)[10:]]
    assert same([second], [expected])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_batch_raises_its_error_in_the_trainer(workers):
    flow = SeededBatches(20, 2, Failing(), seed=0, workers=workers)
    with pytest.raises(ValueError, match="example 7 is bad"):
        draw(flow, passes=1)


def test_a_dead_worker_is_one_clear_error_and_close_leaves_no_process():
    flow = SeededBatches(20, 2, Dying(), seed=0, workers=2)
    flow.reset_state()
    pids = [proc.pid for proc in flow._procs]
    with pytest.raises(DataWorkerError, match=r"data worker 1 of 2 \(pid \d+\) ended without batch 0 of pass 0"):
        next(iter(flow))
    flow.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)   # reaped: nothing left behind


def test_too_small_data_and_bad_shards_are_refused():
    with pytest.raises(ValueError, match="3 examples make no batch of 4"):
        SeededBatches(3, 4, Noisy(), seed=0)
    with pytest.raises(ValueError, match="shard 2 of 2"):
        SeededBatches(8, 4, Noisy(), seed=0).shard(2, 2)


@pytest.mark.parametrize("epochs, expected", [(200, [(100, 0.01), (150, 0.001)]), (10, [(5, 0.01), (8, 0.001)]),
                                              (2, [(1, 0.01), (2, 0.001)]), (1, [(1, 0.001)])])
def test_a_schedule_in_fractions_of_the_epochs(epochs, expected):
    recipe = {"lr_schedule": {"at_fractions": [(0.5, 0.01), (0.75, 0.001)]}}
    assert lr_steps(recipe, epochs) == expected
    assert lr_steps({"lr_schedule": [(30, 0.01)]}, epochs) == [(30, 0.01)]
    assert lr_steps({"lr_schedule": {"halve_every": 100}}, epochs) is None
