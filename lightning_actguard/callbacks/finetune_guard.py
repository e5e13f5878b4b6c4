"""FinetuneGuard: fine-tune boldly, and get a healthy model back whatever the learning rate does."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import move_data_to_device, rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_actguard import _compat
from lightning_actguard._packing import ReduceSum, read_back
from lightning_actguard._warnings import ActGuardWarning
from lightning_actguard.activations import find_activation_layers
from lightning_actguard.callbacks import _finetune_support as support
from lightning_actguard.callbacks._engine_callback import EngineCallback, check_positive_int, loss_values
from lightning_actguard.callbacks._guard import events_table, log_dir_of, publish_event
from lightning_actguard.callbacks.dead_relu_guard import current_learning_rates, layer_can_die
from lightning_actguard.drift import DriftReport, DriftTracker, drift_layers, optimizer_membership
from lightning_actguard.engine import DEFAULT_OVERHEAD_BUDGET, Engine
from lightning_actguard.events import EventLog, GuardEvent
from lightning_actguard.finetune_health import (
    Baseline,
    BaselineRecorder,
    Breach,
    HealthRules,
    canary_breach,
    drift_breaches,
    loss_spike,
    rates_above_cap,
    window_breaches,
)
from lightning_actguard.lr_scaling import scale_learning_rates
from lightning_actguard.revive import Reviver
from lightning_actguard.rollback import RollbackPoint
from lightning_actguard.snapshot import WindowSnapshot
from lightning_actguard.summary import print_summary

#: File names in the run's log directory.
LAST_HEALTHY_CHECKPOINT = "finetune_guard_last_healthy.ckpt"
SNAPSHOT_FILE = "finetune_guard_snapshot.pt"
_SNAPSHOT_WINDOWS = 2
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class FinetuneGuard(EngineCallback):
    r"""Rolls a fine-tuning run back to its last healthy state when the learning rate starts doing harm.

    **Baseline.** On the first training batch, before any update, the guard records the
    pretrained model's health: each activation layer's dead-unit fraction and saturated share,
    which units fire, and the loss (one read-back, once).

    **Watch.** At the end of every window of ``every_n_steps`` optimizer steps, on statistics
    reduced across processes, a window is unhealthy when (see
    :mod:`lightning_actguard.finetune_health`):

    * a ReLU-family layer's dead-unit fraction is more than ``dead_margin`` above its baseline;
    * a sigmoid/tanh-like layer's saturated share is more than ``saturation_margin`` above it;
    * the window's mean loss spiked: above ``loss_spike_ratio`` times *and* ``loss_spike_min_delta``
      above the lowest mean of a healthy window so far (before the first, the baseline loss);
    * a loss or a gradient was NaN or infinite;
    * a layer drifted from its pretrained weights beyond its ``drift_budget``;
    * the ``canary`` batch's loss is more than ``canary_margin`` above its pretrained value.

    **Snapshots.** The guard keeps one healthy state: the model's weights and buffers, every
    optimizer's and LR scheduler's state, and the step. The first is taken when training starts
    (the pretrained model). After ``snapshot_every_n_steps`` healthy steps it is refreshed on the
    next batch, before that batch's update, unless the batch's loss spikes over the last window's
    (so that damage done in a window's last steps is not taken for health). It lives in CPU
    memory, or with ``snapshot_to="disk"`` in one file in the log directory, replaced atomically.
    Cost of a refresh: one copy of the weights and the optimizer state to the host (for Adam,
    three times the parameters); on a GPU it waits for the queued work.

    **On a trigger** the guard restores the snapshot and multiplies every learning rate by
    ``factor`` (schedulers keep the lower rate, see :mod:`lightning_actguard.lr_scaling`; a second
    rollback to the same snapshot lowers it twice), and training goes on. After ``max_rollbacks``
    rollbacks without a new snapshot between them, the next trigger restores the snapshot, saves
    it as a checkpoint to ``<log_dir>/finetune_guard_last_healthy.ckpt`` and stops training.

    **Parameters.** With ``track_drift`` the guard keeps the pretrained parameters on their device
    (one more copy of them in device memory, and in checkpoints) and logs each layer's relative
    drift ``||w - w0|| / ||w0||`` as ``finetune_drift/<layer>``. It warns, once each, about a
    parameter in an optimizer with ``requires_grad`` off, a trainable one in no optimizer, a
    frozen one that changed, and a trained one that did not change in the first window.

    **Revive.** With ``revive``, at the end of each healthy window the units that are dead but
    fired in the baseline get new incoming weights and bias
    (:func:`~lightning_actguard.revive.revive_units`). ``True`` finds each activation's layer
    with :func:`~lightning_actguard.revive.feeding_layer`; ``{activation: layer}`` names them.

    Every rollback, stop, revival, clamp and finding is a :class:`~lightning_actguard.GuardEvent`:
    an ``ActGuardWarning``, ``guard_event/FinetuneGuard`` in the loggers, a line of
    ``actguard_events.jsonl``, an entry of ``guard.events`` (checkpointed), a row of the end-of-fit
    table. Decisions are taken on numbers reduced across processes, so under DDP every rank rolls
    back at the same step.

    Args:
        dead_margin: allowed rise of a layer's dead-unit fraction, in (0, 1], or ``None`` (off).
        saturation_margin: allowed rise of a bounded layer's saturated share, in (0, 1], or ``None``.
        loss_spike_ratio: see above; greater than 1, or ``None``.
        loss_spike_min_delta: see above; non-negative, in the loss's units. It also absorbs the
            noise of the one-batch baseline loss (see :class:`~lightning_actguard.finetune_health.
            HealthRules`); raise it for small batches or losses of a larger scale than cross-entropy.
        every_n_steps: window length in optimizer steps; ``None`` uses ``log_every_n_steps``.
        snapshot_every_n_steps: healthy steps between snapshot refreshes, a multiple of the window
            (default: two windows).
        snapshot_to: ``"memory"`` (CPU memory) or ``"disk"`` (the log directory).
        factor: each rollback multiplies the learning rates by this, in (0, 1).
        min_lr: the learning rates are not lowered below this.
        max_rollbacks: rollbacks without a new snapshot before the guard stops; 0 stops at the
            first trigger.
        lr_cap: the highest starting learning rate allowed, checked when training starts against
            each group's ``lr``, or the ``initial_lr``/``max_lr`` a scheduler climbs to if higher.
        lr_cap_action: above the cap, ``"refuse"`` raises ``ValueError``; ``"clamp"`` scales every
            rate by one factor so that the highest is the cap (group ratios kept), and warns.
        track_drift: keep the pretrained parameters for drift, ``drift_budget`` and the checks.
        drift_budget: largest relative drift allowed: one number for every layer, or
            ``{layer: budget}``; ``None``: no budget.
        canary: a small batch of the original task, evaluated (eval mode, no gradients) at every
            window's end; a pair ``(inputs, targets)`` for the default ``canary_loss``.
        canary_loss: ``(model, canary) -> loss``; default: cross-entropy of ``model(inputs)``.
        canary_margin: allowed rise of the canary loss over its pretrained value, in its units.
        revive: ``False``, ``True`` or ``{activation name: weight layer name}``.
        overhead_budget: share of the step time the package's callbacks may take in all (the
            engine measures fewer batches to stay within it); ``None`` measures every batch.
        print_summary: print the events and the final drift when training ends (rank zero).

    Raises:
        ValueError: an argument is out of range or of the wrong type.

    Example::

        Trainer(callbacks=[FinetuneGuard(every_n_steps=20, lr_cap=1e-3, lr_cap_action="clamp")])

    .. warning::
        A rollback rewinds the model, the optimizers and the schedulers, not the trainer: its step
        counter and the data go on, so the schedule ends behind by the steps undone. A gradient
        scaler's state, EMA weights and other callbacks' state are not rolled back. The snapshot
        is not in checkpoints: a resumed run starts from a snapshot of the state it resumes.
        Sharded strategies (FSDP, DeepSpeed) are refused. With ``snapshot_to="disk"`` under
        several processes rank zero writes the file and every rank reads it, so the log directory
        must be shared.
    """

    def __init__(
        self,
        *,
        dead_margin: float | None = 0.1,
        saturation_margin: float | None = 0.2,
        loss_spike_ratio: float | None = 2.0,
        loss_spike_min_delta: float = 0.25,
        every_n_steps: int | None = None,
        snapshot_every_n_steps: int | None = None,
        snapshot_to: Literal["memory", "disk"] = "memory",
        factor: float = 0.5,
        min_lr: float = 0.0,
        max_rollbacks: int = 5,
        lr_cap: float | None = None,
        lr_cap_action: Literal["refuse", "clamp"] = "refuse",
        track_drift: bool = True,
        drift_budget: float | Mapping[str, float] | None = None,
        canary: Any = None,
        canary_loss: support.CanaryLoss | None = None,
        canary_margin: float = 0.5,
        revive: bool | Mapping[str, str] = False,
        overhead_budget: float | None = DEFAULT_OVERHEAD_BUDGET,
        print_summary: bool = True,
    ) -> None:
        super().__init__(every_n_steps, overhead_budget)
        self.rules = HealthRules(dead_margin, saturation_margin, loss_spike_ratio, loss_spike_min_delta, canary_margin)
        check_positive_int("snapshot_every_n_steps", snapshot_every_n_steps, allow_none=True)
        support.check_choice("snapshot_to", snapshot_to, ("memory", "disk"))
        support.check_choice("lr_cap_action", lr_cap_action, ("refuse", "clamp"))
        support.check_number("factor", factor, "in (0, 1)", lambda value: 0 < value < 1)
        support.check_number("min_lr", min_lr, "a non-negative number", lambda value: value >= 0)
        if lr_cap is not None:
            support.check_number("lr_cap", lr_cap, "a positive number or None", lambda value: value > 0)
        if not isinstance(max_rollbacks, int) or isinstance(max_rollbacks, bool) or max_rollbacks < 0:
            raise ValueError(f"`max_rollbacks` must be a non-negative int, got {max_rollbacks!r}.")
        support.check_canary(canary, canary_loss)
        if not isinstance(revive, (bool, Mapping)):
            raise ValueError(f"`revive` must be a bool or a mapping {{activation: layer}}, got {revive!r}.")
        self.drift_budget = support.checked_budget(drift_budget, track_drift)
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.snapshot_to = snapshot_to
        self.factor, self.min_lr, self.max_rollbacks = factor, min_lr, max_rollbacks
        self.lr_cap, self.lr_cap_action = lr_cap, lr_cap_action
        self.track_drift = track_drift
        self.canary, self.canary_loss = canary, canary_loss or support.cross_entropy_canary
        self.revive = revive
        self.print_summary = print_summary
        self._state_key: str | None = None
        self._reset_guard_state()
        self._reset_run_state()

    def _reset_guard_state(self) -> None:
        """What a checkpoint carries; a new ``fit`` without one starts afresh."""
        self.events: list[GuardEvent] = []
        #: The pretrained model's health, once measured.
        self.baseline: Baseline | None = None
        #: The drift measured at the last window's end.
        self.drift: DriftReport | None = None
        #: Rollbacks so far, and units revived so far.
        self.rollbacks = 0
        self.revivals = 0
        self._rollbacks_without_recovery = 0
        self._best_loss: float | None = None
        self._reported: set[str] = set()
        self._checkpoint_reference: dict[str, Tensor] | None = None

    def _reset_run_state(self) -> None:
        """What lives for one ``fit`` only: hooks, the snapshot, device copies, counters since the snapshot."""
        self._recorder: BaselineRecorder | None = None
        self._point: RollbackPoint | None = None
        self._tracker: DriftTracker | None = None
        self._canary_on_device: Any = None
        self._canary_start: float | None = None
        self._reviver: Reviver | None = None
        self._event_log: EventLog | None = None
        self._snapshot_every = 0
        self._healthy_steps = 0
        self._capture_due = False
        self._pending_factor = 1.0
        self._last_window_step = 0
        self._last_window_loss: float | None = None
        self._watch_frozen: set[str] = set()
        self._watch_trained: set[str] = set()
        self._stopped = False

    # ------------------------------------------------------------------ setting up

    @override
    def configure_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, engine: Engine) -> None:
        if type(trainer.strategy).__name__ in _SHARDED_STRATEGIES:
            raise ValueError(
                f"FinetuneGuard does not support the sharded strategy {type(trainer.strategy).__name__}: its "
                "snapshots copy whole state dicts. Use DDP or a single device."
            )
        window = engine.every_n_steps
        every = self.snapshot_every_n_steps or _SNAPSHOT_WINDOWS * window
        if every % window:
            raise ValueError(
                f"`snapshot_every_n_steps` must be a multiple of the window ({window} steps), got {every}."
            )
        if isinstance(self.drift_budget, Mapping):
            support.check_budget_names(self.drift_budget, drift_layers(pl_module))
        layers = find_activation_layers(pl_module)
        if isinstance(self.revive, Mapping):
            support.check_revive_names(self.revive, [layer.name for layer in layers], dict(pl_module.named_modules()))
        self._reset_guard_state()  # a checkpoint, if any, is loaded after this
        self._reset_run_state()
        self._snapshot_every = every
        engine.use_activations(self, None, layers)
        engine.use_loss(None)
        engine.use_gradients(self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._event_log = EventLog(log_dir_of(trainer))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_lr_cap(trainer)
        membership = optimizer_membership(pl_module, trainer.optimizers)
        self._watch_frozen, self._watch_trained = set(membership.frozen), set(membership.trained)
        self._report(trainer, trainer.global_step, "frozen_in_optimizer", membership.frozen_in_optimizer)
        self._report(trainer, trainer.global_step, "trainable_outside_optimizer", membership.trainable_outside)
        if self.track_drift:
            self._tracker = DriftTracker(pl_module, reference=self._checkpoint_reference)
        if self.canary is not None:
            self._canary_on_device = move_data_to_device(self.canary, pl_module.device)
            if self.baseline is None:
                (self._canary_start,) = read_back([self._canary_value(pl_module)], _mean_reducer(trainer)).values
        path = log_dir_of(trainer) / SNAPSHOT_FILE if self.snapshot_to == "disk" else None
        self._point = RollbackPoint(path, write=trainer.is_global_zero)
        self._capture(trainer, pl_module)
        self._last_window_step = trainer.global_step

    # ------------------------------------------------------------------ the baseline, and snapshot refreshes

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.baseline is not None or self._recorder is not None or self._engine is None:
            return
        measured = self._engine.activations  # the same layers and settings, so that names and numbers match
        if measured is None:
            self._recorder = BaselineRecorder([])
            return
        self._recorder = BaselineRecorder(
            measured.layers,
            unit_dim=measured.unit_dim,
            saturation_eps=measured.saturation_eps,
            max_calls_per_module=measured.max_calls_per_module,
        )

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        if self._recorder is not None:
            self._recorder.pause()
        if self._capture_due:
            self._capture_if_sound(trainer, pl_module, loss)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_after_backward(trainer, pl_module)
        if self._recorder is not None:
            self._recorder.resume()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            loss = loss_values(trainer, outputs, [""]).get("")
            reduce_sum = self._engine.reduce_sum if self._engine is not None else None
            self.baseline = recorder.finish(loss, reduce_sum, trainer.world_size, self._canary_start)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _capture_if_sound(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Refresh the snapshot before this batch's update, unless the batch's loss shows damage."""
        value = loss.detach().float().mean()
        scaler = _compat.grad_scaler(trainer)
        if scaler is not None:
            value = value / scaler.get_scale()
        if pl_module.automatic_optimization:  # Lightning divides the loss it backpropagates
            value = value * trainer.accumulate_grad_batches
        (batch_loss,) = read_back([value.reshape(1)], _mean_reducer(trainer)).values
        reference, rules = self._last_window_loss, self.rules
        damaged = not math.isfinite(batch_loss) or (
            reference is not None
            and rules.loss_spike_ratio is not None
            and loss_spike(batch_loss, reference, rules.loss_spike_ratio, rules.loss_spike_min_delta)
        )
        if damaged:
            self._healthy_steps, self._capture_due = 0, False
            return
        self._capture(trainer, pl_module)
        self._rollbacks_without_recovery = 0

    def _capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._point is not None  # noqa: S101 (made in on_train_start)
        self._point.capture(trainer.global_step, pl_module, trainer.optimizers, _schedulers(trainer))
        if self.snapshot_to == "disk" and trainer.world_size > 1:
            trainer.strategy.barrier("finetune_guard_snapshot")
        self._pending_factor, self._healthy_steps, self._capture_due = 1.0, 0, False

    # ------------------------------------------------------------------ judging a window

    @override
    def on_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: WindowSnapshot) -> None:
        if self.baseline is None or self._stopped:
            return
        steps, self._last_window_step = snapshot.step - self._last_window_step, snapshot.step
        drift, canary = self._measure(trainer, pl_module)
        breaches = window_breaches(snapshot, self.baseline, self.rules, self._reference_loss(), layer_can_die)
        if drift is not None:
            self.drift = drift
            self._check_parameter_changes(trainer, pl_module, drift, snapshot.step)
            breaches += drift_breaches(drift.layers, self._budgets())
        if canary is not None and (forgetting := canary_breach(canary, self.baseline, self.rules)):
            breaches.append(forgetting)
        _log_metrics(trainer, drift, canary)
        if breaches:
            self._roll_back(trainer, pl_module, snapshot.step, breaches)
            return
        window = snapshot.losses.get("")
        if window is not None and window.count and not window.nonfinite:
            self._last_window_loss = window.mean
            self._best_loss = min(window.mean, math.inf if self._best_loss is None else self._best_loss)
        self._healthy_steps += steps
        self._capture_due = self._healthy_steps >= self._snapshot_every
        if self.revive:
            self._revive(trainer, pl_module, snapshot)

    def _reference_loss(self) -> float | None:
        """The lowest healthy window mean; before the first healthy window, the pretrained model's loss."""
        if self._best_loss is not None:
            return self._best_loss
        return self.baseline.loss if self.baseline is not None else None

    def _budgets(self) -> dict[str, float]:
        if self.drift_budget is None or self._tracker is None:
            return {}
        if isinstance(self.drift_budget, Mapping):
            return dict(self.drift_budget)
        return dict.fromkeys(self._tracker.layers, self.drift_budget)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[DriftReport | None, float | None]:
        """Drift and the canary's loss, in one transfer."""
        pieces = self._tracker.pack() if self._tracker is not None else []
        if self._canary_on_device is not None:
            pieces.append(self._canary_value(pl_module))
        if not pieces:
            return None, None
        take = read_back(pieces, _mean_reducer(trainer))
        drift = self._tracker.unpack(take) if self._tracker is not None else None
        canary = take(1)[0] if self._canary_on_device is not None else None
        return drift, canary

    def _canary_value(self, pl_module: pl.LightningModule) -> Tensor:
        """The canary's loss on the device, in eval mode; every module's train/eval mode is put back after."""
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad():
                value = self.canary_loss(pl_module, self._canary_on_device)
        finally:
            for module, mode in modes.items():
                module.training = mode
        return value.detach().float().mean().reshape(1)

    def _check_parameter_changes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, drift: DriftReport, step: int
    ) -> None:
        trainable = {name for name, param in pl_module.named_parameters() if param.requires_grad}
        # A frozen parameter unfrozen since the start (gradual unfreezing) may change.
        changed_frozen = sorted(name for name in self._watch_frozen - trainable if drift.changes.get(name, 0.0) != 0.0)
        unchanged = sorted(drift.unchanged(self._watch_trained))
        self._watch_frozen -= set(changed_frozen)
        self._watch_trained.clear()  # judged on the first window only
        self._report(trainer, step, "frozen_changed", changed_frozen)
        self._report(trainer, step, "never_updated", unchanged)

    # ------------------------------------------------------------------ acting

    def _roll_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, breaches: list[Breach]) -> None:
        assert self._point is not None  # noqa: S101 (made in on_train_start)
        self._healthy_steps, self._capture_due = 0, False
        before, schedulers = current_learning_rates(trainer), _schedulers(trainer)
        restored = self._point.restore(pl_module, trainer.optimizers, schedulers)
        stopping = self._rollbacks_without_recovery >= self.max_rollbacks
        if not stopping:
            self._pending_factor *= self.factor
            self._rollbacks_without_recovery += 1
            self.rollbacks += 1
        if self._pending_factor < 1.0:  # the snapshot holds the rate before the reductions since it was taken
            scale_learning_rates(trainer.optimizers, schedulers, self._pending_factor, self.min_lr)
        after = current_learning_rates(trainer)
        rates = ", ".join(f"{old:.3g} -> {new:.3g}" for old, new in zip(before, after, strict=True))
        evidence: dict[str, Any] = {breach.kind: breach.evidence for breach in breaches}
        evidence |= {"restored_step": restored, "learning_rates": after, "rollbacks": self.rollbacks}
        condition, cause = "; ".join(breach.condition for breach in breaches), support.diagnosis(breaches)
        if not stopping:
            outcome = f"restored the weights, optimizer and scheduler state of step {restored}; learning rate {rates}"
            undo = "none needed: the state rolled back from was unhealthy; the lowered rate stays in the optimizer"
            self._act(trainer, step, "rollback", condition, outcome, evidence=evidence, diagnosis=cause, undo=undo)
            return
        path = log_dir_of(trainer) / LAST_HEALTHY_CHECKPOINT
        outcome = (
            f"{self._rollbacks_without_recovery} rollback(s) without recovery: restored the last healthy state "
            f"(step {restored}), saved it to {path} and stopped training"
        )
        undo = f"resume with trainer.fit(model, ckpt_path={str(path)!r}) after fixing the cause"
        self._stopped = True
        self._act(trainer, step, "stop", condition, outcome, evidence=evidence, diagnosis=cause, undo=undo)
        _save_checkpoint(trainer, path)
        trainer.should_stop = True

    def _revive(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: WindowSnapshot) -> None:
        assert self.baseline is not None  # noqa: S101 (checked in on_window)
        if self._reviver is None:
            layers = self.revive if isinstance(self.revive, Mapping) else None
            self._reviver = Reviver(pl_module, self.baseline.alive_units, layers, on_missing=_warn_not_revivable)
        dead = {name: stats.dead_units for name, stats in snapshot.activations.items() if layer_can_die(stats)}
        for revival in self._reviver.revive(dead, trainer.optimizers, seed=snapshot.step):
            self.revivals += len(revival.units)
            self._act(
                trainer,
                snapshot.step,
                "revive",
                f"{len(revival.units)} unit(s) of {revival.activation!r} died during fine-tuning (they fired in "
                "the pretrained model)",
                f"re-initialised the incoming weights and bias of units {revival.units} of {revival.layer!r}",
                evidence={"activation": revival.activation, "layer": revival.layer, "units": revival.units},
                diagnosis="dead ReLU units get no gradient and never come back on their own",
                undo="resume from a checkpoint taken before this step",
            )

    def _apply_lr_cap(self, trainer: pl.Trainer) -> None:
        above = rates_above_cap(trainer.optimizers, self.lr_cap) if self.lr_cap is not None else []
        if not above:
            return
        described = ", ".join(f"optimizer {index} group {group}: {rate:.3g}" for index, group, rate in above)
        condition = f"the starting learning rate is above lr_cap={self.lr_cap:g} ({described})"
        if self.lr_cap_action == "refuse":
            raise ValueError(f"FinetuneGuard: {condition}. Lower it, or pass lr_cap_action='clamp' to scale it down.")
        factor = self.lr_cap / max(rate for *_, rate in above)  # type: ignore[operator]
        before = current_learning_rates(trainer)
        scale_learning_rates(trainer.optimizers, _schedulers(trainer), factor)
        after = current_learning_rates(trainer)
        rates = ", ".join(f"{old:.3g} -> {new:.3g}" for old, new in zip(before, after, strict=True))
        outcome = f"scaled every learning rate by {factor:.3g}, schedulers included: {rates}"
        evidence = {"lr_cap": self.lr_cap, "factor": factor, "learning_rates": after}
        self._act(trainer, trainer.global_step, "clamp_lr", condition, outcome, evidence=evidence, undo="raise lr_cap")

    # ------------------------------------------------------------------ records

    def _report(self, trainer: pl.Trainer, step: int, finding: str, names: list[str]) -> None:
        """One warning event for the parameters newly found in ``finding``; each is reported once."""
        names = [name for name in names if f"{finding}:{name}" not in self._reported]
        if not names:
            return
        self._reported.update(f"{finding}:{name}" for name in names)
        what, advice = support.PARAMETER_FINDINGS[finding]
        condition = f"{len(names)} parameter(s) {what}: {', '.join(names)}"
        evidence = {"finding": finding, "parameters": names}
        self._act(trainer, step, "warn", condition, "warned", evidence=evidence, diagnosis=advice)

    def _act(
        self,
        trainer: pl.Trainer,
        step: int,
        action: str,
        condition: str,
        outcome: str,
        *,
        evidence: Mapping[str, Any],
        diagnosis: str = "",
        undo: str = "",
    ) -> None:
        """Record an event: kept, warned (rank zero), logged and appended to the event log."""
        severity = {"warn": "warning", "stop": "stop"}.get(action, "action")
        event = GuardEvent(step, "FinetuneGuard", severity, condition, dict(evidence), diagnosis, action, outcome, undo)
        self.events.append(event)
        publish_event(trainer, event, self._event_log)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.print_summary and self.events:
            rank_zero_only(print_summary)(events_table("FinetuneGuard", self.events))
        if self.print_summary and self.drift is not None:
            rank_zero_only(print_summary)(support.drift_table(self.drift, self._budgets()))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drop_run_state()
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drop_run_state()
        super().on_exception(trainer, pl_module, exception)

    def _drop_run_state(self) -> None:
        if self._recorder is not None:
            self._recorder.detach()
        self._reset_run_state()

    # ------------------------------------------------------------------ checkpoints

    @property
    @override
    def state_key(self) -> str:
        if self._state_key is None:
            self._state_key = self._generate_state_key(dead_margin=self.rules.dead_margin, factor=self.factor)
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        reference = self._tracker.reference_state() if self._tracker is not None else self._checkpoint_reference
        return {
            "events": [event.to_dict() for event in self.events],
            "baseline": self.baseline.to_dict() if self.baseline is not None else None,
            "best_loss": self._best_loss,
            "rollbacks": self.rollbacks,
            "rollbacks_without_recovery": self._rollbacks_without_recovery,
            "revivals": self.revivals,
            "reported": sorted(self._reported),
            "reference": reference,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = [GuardEvent.from_dict(values) for values in state_dict.get("events", [])]
        baseline = state_dict.get("baseline")
        self.baseline = Baseline.from_dict(baseline) if baseline is not None else None
        self._best_loss = state_dict.get("best_loss")
        self.rollbacks = state_dict.get("rollbacks", 0)
        self._rollbacks_without_recovery = state_dict.get("rollbacks_without_recovery", 0)
        self.revivals = state_dict.get("revivals", 0)
        self._reported = set(state_dict.get("reported", ()))
        self._checkpoint_reference = state_dict.get("reference")


def _schedulers(trainer: pl.Trainer) -> list[Any]:
    return [config.scheduler for config in trainer.lr_scheduler_configs]


def _mean_reducer(trainer: pl.Trainer) -> ReduceSum | None:
    """Averages across processes, so that every rank decides on the same numbers."""
    if trainer.world_size == 1:
        return None
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="mean")


@rank_zero_only
def _log_metrics(trainer: pl.Trainer, drift: DriftReport | None, canary: float | None) -> None:
    metrics = {f"finetune_drift/{layer}": value for layer, value in (drift.layers if drift else {}).items()}
    if canary is not None:
        metrics["finetune_canary_loss"] = canary
    step = _compat.logger_step(trainer)
    for logger in trainer.loggers if metrics else ():
        logger.log_metrics(metrics, step=step)


def _warn_not_revivable(activation: str, units: int) -> None:
    rank_zero_warn(
        f"FinetuneGuard cannot revive the units of {activation!r}: no Linear or convolution layer with {units} "
        "outputs feeds it by the rule of lightning_actguard.revive.feeding_layer. Name the layer with "
        f"revive={{{activation!r}: '<layer name>'}}.",
        category=ActGuardWarning,
    )


def _save_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """Every rank calls ``save_checkpoint``, as Lightning requires; a failure to write is reported, not raised."""
    try:
        trainer.save_checkpoint(path, weights_only=False)
    except OSError as error:
        rank_zero_warn(
            f"FinetuneGuard could not save the last healthy state to {path} ({error}); the model in memory holds it.",
            category=ActGuardWarning,
        )
