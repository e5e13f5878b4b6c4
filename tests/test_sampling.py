"""How the engine estimates its cost and spaces its measured batches: hand-made timings, then a run."""

import pytest
import pytorch_lightning as pl
from conftest import tiny_trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import lightning_actguard.engine as engine_module
from lightning_actguard import ActivationMonitor
from lightning_actguard.callbacks import _engine_callback
from lightning_actguard.engine import Engine, OverheadEstimate, engine_for


def timings(work, measured, unmeasured=(0.0, 0), charged=0.0, window_end=0.0, *, opening=(0.0, 0), batches=50):
    """A window's cost vector; ``measured``, ``unmeasured`` and ``opening`` are (total seconds, intervals)."""
    measured_batches = measured[1] + opening[1]
    return [work, *measured, *unmeasured, charged, *opening, window_end, measured_batches, batches]


@pytest.fixture
def engine():
    engine = Engine(nn.Linear(1, 1), every_n_steps=50, reduce_sum=None, world_size=1)
    engine.overhead_budget = 0.02
    return engine


@pytest.mark.parametrize(("work_per_batch", "every"), [(0.001, 1), (0.005, 3)])
def test_a_first_window_measured_in_full_uses_the_hooks_timers(engine, work_per_batch, every):
    # 50 batches of 0.1 s, all measured. 1 ms in the hooks leaves 99 ms of training: 50 measured
    # batches cost 1% of it, within 2%. 5 ms leaves 95 ms: the budget, 0.02 * 50 * 0.095 s, pays
    # for 19 measured batches, so every 3rd (17 of 50) and not every 2nd (25).
    engine._choose_sampling(timings(50 * work_per_batch, (5.0, 50)))
    assert engine.sample_every == every
    assert engine.estimate.plain_batch == pytest.approx(0.1 - work_per_batch)


def test_measured_batches_that_run_slower_than_the_hooks_account_for_widen_the_spacing(engine):
    # The hooks timed 1 ms, but the 5 measured batches took 0.15 s against 0.1 s for the 45
    # others: 50 ms a measured batch. The budget (0.1 s a window) pays for 2: every 25th.
    engine._choose_sampling(timings(0.005, (0.75, 5), (4.5, 45)))
    assert engine.estimate.measured_batch == pytest.approx(0.05)
    assert engine.sample_every == 25
    # The next window's 10 ms is averaged with the 50 ms before: 30 ms pays for 3, every 17th.
    engine._choose_sampling(timings(0.002, (0.22, 2), (4.8, 48)))
    assert engine.estimate.measured_batch == pytest.approx(0.03)
    assert engine.sample_every == 17


def test_what_every_batch_and_each_window_end_cost_comes_out_of_the_budget(engine):
    # Measured batches cost 10 ms more than the others. Without other costs the budget
    # (0.02 * 50 * 0.1 s) pays for 10 measured batches: every 5th.
    engine._choose_sampling(timings(0.005, (0.55, 5), (4.5, 45)))
    assert engine.sample_every == 5
    # 1 ms of the callbacks' own time on every batch and 10 ms at the window's end leave
    # 0.02 * 50 * 0.099 - 0.05 - 0.01 = 0.039 s: 3 measured batches, every 17th.
    fresh = Engine(nn.Linear(1, 1), every_n_steps=50, reduce_sum=None, world_size=1)
    fresh.overhead_budget = 0.02
    fresh._choose_sampling(timings(0.005, (0.55, 5), (4.5, 45), charged=0.045, window_end=0.01))
    assert fresh.estimate == OverheadEstimate(
        measured_batch=pytest.approx(0.01),
        every_batch=pytest.approx(0.001),
        window_end=pytest.approx(0.01),
        plain_batch=pytest.approx(0.099),
    )
    assert fresh.sample_every == 17
    # The window just read: 5 measured batches, (5 * 0.01 + 50 * 0.001 + 0.01) / (50 * 0.099).
    assert fresh.overhead == pytest.approx(0.11 / 4.95)
    assert not fresh.over_budget


def test_what_the_first_batch_of_a_window_costs_beyond_other_measured_ones_is_a_window_cost(engine):
    # The opening batch took 0.16 s, the 4 other measured ones 0.11 s, the 45 others 0.1 s: a
    # measured batch costs 10 ms, and opening a window 50 ms more.
    engine._choose_sampling(timings(0.005, (0.44, 4), (4.5, 45), opening=(0.16, 1)))
    assert engine.estimate.measured_batch == pytest.approx(0.01)
    assert engine.estimate.window_end == pytest.approx(0.05)
    # (0.1 - 0.05) / 0.01 = 5 measured batches: every 10th.
    assert engine.sample_every == 10


def test_costs_above_the_budget_at_one_measured_batch_a_window_are_flagged(engine):
    # 2 ms on every batch is already 2% of a 98 ms batch, before the window's end.
    engine._choose_sampling(timings(0.005, (0.55, 5), (4.5, 45), charged=0.09, window_end=0.01))
    assert engine.over_budget
    assert engine.sample_every == 50
    assert engine.estimate.share(1, 50) > 0.02


def test_without_a_budget_every_batch_is_measured_and_the_cost_is_still_estimated(engine):
    engine.overhead_budget = None
    engine._choose_sampling(timings(0.005, (0.75, 5), (4.5, 45)))
    assert engine.sample_every == 1
    assert engine.overhead == pytest.approx(5 * 0.05 / 5.0)


def test_each_interval_is_filed_by_kind_and_interrupted_ones_are_left_out(engine, monkeypatch):
    clock = iter([0.0, 0.15, 0.25, 1.0, 1.2])
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: next(clock))
    engine.every_n_steps, engine.sample_every = 4, 2
    engine._windows = 1  # the run's first window opens with one-off set-up work, and is left out
    engine.start_batch("b0")  # t=0, measured: the window's opening
    engine.charge(0.002)
    engine.end_batch("b0", 1)
    engine.start_batch("b1")  # t=0.15: b0 took 0.15
    engine.charge(0.001)
    engine.end_batch("b1", 2)
    engine.start_batch("b2")  # t=0.25: b1 took 0.1 (1 ms of it charged), unmeasured
    engine.interrupt()  # say validation runs after this batch
    engine.end_batch("b2", 3)
    engine.start_batch("b3")  # t=1.0: b2's interval is left out
    engine.charge(0.003)
    assert engine.end_batch("b3", 4) is not None  # closes the window
    # Read at the close: c = 0.15 - 0.1 (the opening is the only measured interval, so it stands
    # for all), f = 0.001, p = 0.099; b0 and b2 measured of 4.
    assert engine.overhead == pytest.approx((2 * 0.05 + 4 * 0.001) / (4 * 0.099))
    engine.start_batch("b4")  # t=1.2: what b3 was charged is the window end
    assert engine._timing.window_end == pytest.approx(0.003)
    assert engine._timing.measured_count == engine._timing.unmeasured_count == engine._timing.opening_count == 0


def test_the_first_batch_of_a_run_is_left_out_of_the_timings(engine, monkeypatch):
    clock = iter([0.0, 5.0])
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: next(clock))
    engine.start_batch("b0")
    engine.end_batch("b0", 1)
    engine.start_batch("b1")
    assert engine._timing == type(engine._timing)()


class RecordEstimates(pl.Callback):
    def __init__(self):
        self.estimates, self.measured = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        latest = engine_for(pl_module).latest
        if latest is not None and latest.step == trainer.global_step:
            self.estimates.append(latest.overhead)
            self.measured.append(latest.measured_batches)


def test_the_estimate_is_logged_and_a_budget_too_small_for_one_batch_is_said_once(
    tmp_path, known_dead_model, monkeypatch
):
    said = []
    monkeypatch.setattr(_engine_callback, "rank_zero_info", said.append)
    logger = TensorBoardLogger(tmp_path, name="run")
    record = RecordEstimates()
    # No run can measure a batch within a budget of a millionth of its time.
    monitor = ActivationMonitor(overhead_budget=1e-6, print_summary=False)
    trainer = tiny_trainer(tmp_path, logger=logger, callbacks=[monitor, record])
    trainer.fit(known_dead_model)

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    logged = [event.value for event in events.Scalars("act_overhead")]
    assert logged == pytest.approx(record.estimates, rel=1e-6)
    assert all(value > 0 for value in logged)
    # The first window is measured in full; after it, only each window's first batch.
    assert record.measured == [5, 1, 1, 1]
    assert len(said) == 1
    assert "more than overhead_budget=1e-06" in said[0]
    assert "measure one batch per window" in said[0]


def test_over_budget_is_said_once_and_only_with_every_figure_timed(engine, monkeypatch):
    said = []
    monkeypatch.setattr(_engine_callback, "rank_zero_info", said.append)
    report = _engine_callback.EngineCallback._report_over_budget
    engine.over_budget = True
    # A first window measured in full has timed neither an unmeasured batch nor a window's end.
    engine.estimate = OverheadEstimate(measured_batch=0.004, every_batch=0.0, window_end=0.0, plain_batch=0.005)
    report(engine)
    assert said == []
    engine.estimate = OverheadEstimate(measured_batch=0.004, every_batch=0.0001, window_end=0.002, plain_batch=0.005)
    report(engine)
    report(engine)
    assert len(said) == 1
    figures = "a batch takes 5 ms, a measured batch 4 ms more, every batch 0.1 ms more, and closing a window 2 ms"
    assert figures in said[0]
