"""rrr.failure_set (unit): the data cursor (no query twice in a step, a fresh permutation per epoch, an exact
resume from its state) and loading a failure set with its pass-rate filter and errors. Moved from
test_trainer.py and test_trainer_core.py when the trainer was split."""

from __future__ import annotations

import json

import pytest

from rrr import failure_set
from rrr.config import UserError


def test_cursor_is_an_epoch_aware_permutation_that_resumes_exactly():
    cursor = failure_set.FailureCursor(n=5, seed=3)
    draws = [cursor.draw(3) for _ in range(4)]                    # 12 draws over 3 epochs
    flat = sum(draws, [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert flat[:5] != flat[5:10]                                 # a fresh permutation per epoch
    replay = failure_set.FailureCursor(n=5, seed=3)
    replay.draw(3), replay.draw(3)
    resumed = failure_set.FailureCursor.from_state(json.loads(json.dumps(replay.state())))
    assert [resumed.draw(3), resumed.draw(3)] == draws[2:]


def test_failure_set_filter_and_errors(tmp_path, failures):
    examples, stored = failure_set.load_failure_set(str(failures), 0.1, 0.5)
    assert [e.id for e in examples] == ["cd1", "cd2"] and len(stored[0]["token_ids"]) == 2
    with pytest.raises(UserError, match="train.failures is not set"):
        failure_set.load_failure_set(None, 0.0, 1.0)
    with pytest.raises(UserError, match="no failed queries"):
        failure_set.load_failure_set(str(failures), 0.9, 1.0)
    with pytest.raises(UserError, match="no failures.parquet"):
        failure_set.load_failure_set(str(tmp_path), 0.0, 1.0)


@pytest.mark.parametrize("n,k,seed", [(3, 2, 2), (5, 3, 0), (7, 4, 1), (4, 4, 3), (2, 1, 0)])
def test_no_query_twice_in_one_step_and_each_epoch_a_permutation(n, k, seed):
    cursor = failure_set.FailureCursor(n=n, seed=seed)
    draws = [cursor.draw(k) for _ in range(4 * n)]
    assert all(len(set(d)) == k for d in draws), draws
    flat = sum(draws, [])
    for e in range(len(flat) // n):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
    replay = failure_set.FailureCursor(n=n, seed=seed)                 # resume from any step's state
    for i in range(len(draws) - 1):
        resumed = failure_set.FailureCursor.from_state(json.loads(json.dumps(replay.state())))
        assert resumed.draw(k) == draws[i]
        replay.draw(k)


def test_seed_2_n_3_batch_2_no_longer_draws_the_same_query_twice():
    cursor = failure_set.FailureCursor(n=3, seed=2)
    assert all(len(set(cursor.draw(2))) == 2 for _ in range(10))
