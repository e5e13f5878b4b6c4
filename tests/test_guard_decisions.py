"""Guards' decisions on hand-made windows: thresholds, patience, hysteresis, ladders, cooldown, state."""

from types import SimpleNamespace

import pytest
import torch

from lightning_actguard import ActGuardWarning, DeadReLUGuard, LossPlateauGuard
from lightning_actguard.losses import LossWindow
from lightning_actguard.snapshot import ActivationStats, WindowSnapshot


def relu_layer(dead_frac):
    return ActivationStats(
        name="act",
        kind="relu",
        units=10,
        dead_frac=dead_frac,
        zero_frac=dead_frac,
        saturated_frac=None,
        out_mean=0.0,
        out_std=1.0,
        in_mean=0.0,
        in_std=1.0,
        nonfinite=0,
        dead_units=torch.zeros(10, dtype=torch.bool),
    )


def window(step, dead_frac=0.0, loss=None):
    losses = {} if loss is None else {"": LossWindow(mean=loss, count=10, nonfinite=0)}
    return WindowSnapshot(step=step, batches=10, activations={"act": relu_layer(dead_frac)}, losses=losses)


def stub_trainer(lr=1.0):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return SimpleNamespace(
        optimizers=[optimizer],
        lr_scheduler_configs=[],
        loggers=[],
        should_stop=False,
        log_every_n_steps=10,
        global_step=0,
    )


def feed(guard, trainer, windows):
    """Give the guard each window; return the action taken at each (None when it did nothing)."""
    taken = []
    for snapshot in windows:
        before = len(guard.events)
        guard.on_window(trainer, None, snapshot)
        taken.append(guard.events[-1].action if len(guard.events) > before else None)
    return taken


def test_dead_relu_guard_needs_patience_windows_above_the_threshold():
    guard = DeadReLUGuard(threshold=0.9, patience=2, action="reduce_lr", cooldown=0)
    fractions = [0.95, 0.5, 0.95, 0.95]
    with pytest.warns(
        ActGuardWarning, match=r"DeadReLUGuard at step 40: dead units above 90% in 1 layer\(s\): 'act' 95%"
    ):
        taken = feed(guard, stub_trainer(), [window(10 * (i + 1), f) for i, f in enumerate(fractions)])
    assert taken == [None, None, None, "reduce_lr"]


def test_hysteresis_keeps_a_hovering_value_from_flapping():
    # Triggered at 0.95; 0.88 is inside the band (0.85, 0.9]: same episode, so the ladder goes on;
    # 0.80 clears it, so the next trigger starts the ladder again with a warning.
    guard = DeadReLUGuard(threshold=0.9, hysteresis=0.05, action=("warn", "reduce_lr", "stop"), cooldown=0)
    trainer = stub_trainer(lr=1.0)
    fractions = [0.95, 0.88, 0.80, 0.95]
    with pytest.warns(ActGuardWarning):
        taken = feed(guard, trainer, [window(10 * (i + 1), f) for i, f in enumerate(fractions)])
    assert taken == ["warn", "reduce_lr", None, "warn"]
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.5
    assert not trainer.should_stop


def test_the_ladder_climbs_while_the_condition_persists_and_stop_stops():
    guard = DeadReLUGuard(threshold=0.9, action=("warn", "reduce_lr", "stop"), cooldown=0)
    trainer = stub_trainer(lr=0.8)
    with pytest.warns(ActGuardWarning):
        taken = feed(guard, trainer, [window(10 * (i + 1), 1.0) for i in range(5)])
    assert taken == ["warn", "reduce_lr", "stop", None, None]
    assert trainer.should_stop
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.4)
    assert [event.severity for event in guard.events] == ["warning", "action", "stop"]


def test_reduce_lr_repeats_after_each_cooldown_and_never_below_min_lr():
    guard = DeadReLUGuard(threshold=0.9, action="reduce_lr", cooldown=20, factor=0.5, min_lr=0.3)
    trainer = stub_trainer(lr=1.0)
    with pytest.warns(ActGuardWarning):
        taken = feed(guard, trainer, [window(10 * (i + 1), 1.0) for i in range(7)])
    assert taken == ["reduce_lr", None, "reduce_lr", None, "reduce_lr", None, "reduce_lr"]
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.3
    assert [event.outcome.split("(")[-1] for event in guard.events[:2]] == [
        "optimizer 0 group 0: 1 -> 0.5)",
        "optimizer 0 group 0: 0.5 -> 0.3)",
    ]
    assert guard.events[-1].outcome == "learning rate already at min_lr=0.3: nothing lowered"


def test_plateau_guard_counts_steps_since_the_best_smoothed_loss():
    guard = LossPlateauGuard(patience=30, min_delta=0.01, smoothing=0.0, action="warn")
    losses = [2.0, 1.5, 1.499, 1.498, 1.497, 1.2]
    with pytest.warns(ActGuardWarning, match=r"no improvement of the loss for 30 steps \(best 1.5 at step 20"):
        taken = feed(guard, stub_trainer(), [window(10 * (i + 1), loss=value) for i, value in enumerate(losses)])
    assert taken == [None, None, None, None, "warn", None]


def test_plateau_guard_acts_at_once_on_divergence_and_non_finite_losses():
    guard = LossPlateauGuard(patience=1000, smoothing=0.0, divergence_ratio=3.0, action="reduce_lr", cooldown=0)
    trainer = stub_trainer(lr=1.0)
    nonfinite = WindowSnapshot(step=30, batches=10, activations={}, losses={"": LossWindow(2.0, 9, 1)})
    with pytest.warns(ActGuardWarning) as record:
        taken = feed(guard, trainer, [window(10, loss=1.0), window(20, loss=3.5), nonfinite])
    assert taken == [None, "reduce_lr", "reduce_lr"]
    messages = [str(warning.message) for warning in record]
    assert "the loss is diverging: 3.5, over 3 times its best 1 (step 10)" in messages[0]
    assert "the loss was NaN or infinite at 1 step(s) of the last window" in messages[1]
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.25


def test_plateau_guard_ignores_the_warm_up():
    guard = LossPlateauGuard(patience=10, smoothing=0.0, warmup_steps=30, action="warn")
    taken = feed(guard, stub_trainer(), [window(10 * (i + 1), loss=1.0) for i in range(3)])
    assert taken == [None, None, None]
    assert guard.guard_state()["best"] is None


def test_guard_state_round_trips_through_a_checkpoint_dict():
    guard = DeadReLUGuard(threshold=0.9, patience=3, action=("warn", "stop"), cooldown=0)
    with pytest.warns(ActGuardWarning):
        feed(guard, stub_trainer(), [window(10, 0.95), window(20, 0.95), window(30, 0.95)])
    restored = DeadReLUGuard(threshold=0.9, patience=3, action=("warn", "stop"), cooldown=0)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    assert restored.events == guard.events
    assert restored.state_key == guard.state_key
    assert restored.state_key != DeadReLUGuard(threshold=0.8).state_key


@pytest.mark.parametrize(
    ("guard", "kwargs", "message"),
    [
        (DeadReLUGuard, {"threshold": 0.0}, r"`threshold` must be in \(0, 1\], got 0.0"),
        (DeadReLUGuard, {"patience": -1}, "`patience` must be a positive int, got -1"),
        (DeadReLUGuard, {"hysteresis": 0.95}, r"`hysteresis` must be in \[0, threshold\), got 0.95"),
        (DeadReLUGuard, {"action": "lower"}, r"must be one of \('warn', 'reduce_lr', 'swap', 'stop'\).*got 'lower'"),
        (DeadReLUGuard, {"action": ()}, "`action` must be one of"),
        (DeadReLUGuard, {"factor": 1.5}, r"`factor` must be in \(0, 1\), got 1.5"),
        (DeadReLUGuard, {"min_lr": -1.0}, "`min_lr` must be a non-negative number, got -1.0"),
        (DeadReLUGuard, {"cooldown": -5}, "`cooldown` must be a non-negative int or None, got -5"),
        (LossPlateauGuard, {"patience": 0}, "`patience` must be a positive int, got 0"),
        (LossPlateauGuard, {"min_delta": -0.1}, "`min_delta` must be a non-negative number, got -0.1"),
        (LossPlateauGuard, {"warmup_steps": -1}, "`warmup_steps` must be a non-negative int, got -1"),
        (LossPlateauGuard, {"smoothing": 1.0}, r"`smoothing` must be in \[0, 1\), got 1.0"),
        (LossPlateauGuard, {"divergence_ratio": 0.5}, "`divergence_ratio` must be greater than 1 or None, got 0.5"),
        (LossPlateauGuard, {"monitor": ""}, "`monitor` must be the name of a logged metric or None, got ''"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else (str(value) if isinstance(value, dict) else ""),
)
def test_bad_arguments_are_refused_at_construction(guard, kwargs, message):
    with pytest.raises(ValueError, match=message):
        guard(**kwargs)
