"""What a guard can do when it triggers. Each action is a function from the situation to an outcome.

Adding an action means adding a function to :data:`ACTIONS`; the guards validate their
``action`` argument against its keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl

from lightning_actguard.lr_scaling import scale_learning_rates, unsupported_schedulers


@dataclass(frozen=True)
class Situation:
    """What an action gets to work with."""

    trainer: pl.Trainer
    guard: str
    step: int
    condition: str
    factor: float
    min_lr: float
    evidence: Mapping[str, Any] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    swapper: Callable[[Situation], Outcome] | None = None


@dataclass(frozen=True)
class Outcome:
    """What an action did, for the event record."""

    severity: str
    outcome: str
    undo: str = ""
    changed: bool = True


def warn(situation: Situation) -> Outcome:
    """Only tell the user (the guard's warning carries the diagnosis)."""
    return Outcome("warning", "warned", changed=False)


def reduce_lr(situation: Situation) -> Outcome:
    """Multiply every param group's learning rate by ``factor`` (not below ``min_lr``), schedulers included."""
    trainer = situation.trainer
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    changes = scale_learning_rates(trainer.optimizers, schedulers, situation.factor, situation.min_lr)
    changes = [change for change in changes if change.new != change.old]
    if not changes:
        nothing = f"learning rate already at min_lr={situation.min_lr:g}: nothing lowered"
        return Outcome("warning", nothing, changed=False)
    described = ", ".join(f"optimizer {c.optimizer} group {c.group}: {c.old:.3g} -> {c.new:.3g}" for c in changes)
    outcome = f"lowered the learning rate ({described})"
    unknown = unsupported_schedulers(schedulers)
    if unknown:
        outcome += f"; {', '.join(unknown)} may overwrite it: this scheduler type is not covered"
    undo = (
        "raise each group back with lightning_actguard.lr_scaling.scale_learning_rates(trainer.optimizers, schedulers, "
        f"old / new) ({', '.join(f'optimizer {c.optimizer} group {c.group} back to {c.old:.3g}' for c in changes)}), "
        f"or resume from a checkpoint taken before step {situation.step}"
    )
    return Outcome("action", outcome, undo)


def stop(situation: Situation) -> Outcome:
    """Stop training the trainer's normal way: the loop ends, callbacks and checkpoints run."""
    situation.trainer.should_stop = True
    undo = "resume with trainer.fit(model, ckpt_path=...) from the last checkpoint, after fixing the cause"
    return Outcome("stop", f"stopped training at step {situation.step}", undo)


def swap(situation: Situation) -> Outcome:
    """Replace the activations the guard's finding names, as the guard's swap mapping says."""
    if situation.swapper is None:
        return Outcome("warning", "nothing swapped: this guard has no swap configured", changed=False)
    return situation.swapper(situation)


#: Action name -> function. The guards accept these names in ``action``.
ACTIONS: dict[str, Callable[[Situation], Outcome]] = {"warn": warn, "reduce_lr": reduce_lr, "swap": swap, "stop": stop}
