"""How the engine spaces its measured batches to stay within the overhead budget, from hand-made timings."""

import pytest
from torch import nn

from lightning_actguard.engine import Engine


def timings(work, measured_wall, measured_intervals, unmeasured_wall, unmeasured_intervals, measured, batches):
    wall = measured_wall + unmeasured_wall
    intervals = measured_intervals + unmeasured_intervals
    return [work, wall, intervals, measured_wall, measured_intervals, measured, batches]


@pytest.fixture
def engine():
    engine = Engine(nn.Linear(1, 1), every_n_steps=10, reduce_sum=None, world_size=1)
    engine.overhead_budget = 0.02
    return engine


@pytest.mark.parametrize(("work", "every"), [(0.01, 1), (0.05, 3)])
def test_a_first_window_measured_in_full_uses_the_hooks_timers(engine, work, every):
    # 10 batches of 0.1 s. 1 ms a batch in the hooks is 1% of the 99 ms left: within 2%, measure
    # every batch. 5 ms is 5.3% of 95 ms: measure every 3rd.
    engine._choose_sampling(timings(work, 1.0, 10, 0.0, 0, 10, 10))
    assert engine.sample_every == every


def test_measured_batches_that_run_slower_than_the_hooks_account_for_widen_the_spacing(engine):
    # The hooks timed 1 ms, but the 2 measured batches took 0.15 s against 0.1 s for the 8 others:
    # 50 ms a measured batch is 50% of a plain one, 25 times the 2% budget.
    engine._choose_sampling(timings(0.002, 0.3, 2, 0.8, 8, 2, 10))
    assert engine.sample_every == 25
    # The next window's 10 ms is averaged with the 50 ms before: 30 ms -> every 15th.
    engine._choose_sampling(timings(0.002, 0.22, 2, 0.8, 8, 2, 10))
    assert engine.sample_every == 15


def test_a_first_window_timed_by_the_hooks_only_does_not_dilute_what_is_observed_later(engine):
    engine._choose_sampling(timings(0.01, 1.0, 10, 0.0, 0, 10, 10))  # 1 ms timed, measure every batch
    assert engine.sample_every == 1
    engine._choose_sampling(timings(0.002, 0.3, 2, 0.8, 8, 2, 10))  # 50 ms observed
    assert engine.sample_every == 25


def test_without_a_budget_every_batch_is_measured(engine):
    engine.overhead_budget = None
    engine._choose_sampling(timings(0.002, 0.3, 2, 0.8, 8, 2, 10))
    assert engine.sample_every == 1
