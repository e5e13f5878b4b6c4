"""The guards' ``"swap"`` action: replace the activations a diagnosis names, judge the swap, undo it if it hurt.

A swap changes the model's structure mid-run, so it needs more care than the other actions:

- the new modules go onto the same device and dtype, the monitors' hooks move to them, and a
  learnable replacement's parameters join the optimizer next to their layer's;
- after ``review_steps`` the window loss is compared with the loss of the window that
  triggered the swap: the swap is reported as having helped or not, and, with
  ``revert_if_worse``, a swap after which the loss rose is undone;
- a checkpoint records the swaps that stand, and a run resumed from it redoes them in the
  freshly built model before its weights load (the module's ``on_load_checkpoint`` runs them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from torch import nn

from lightning_actguard.callbacks._actions import Outcome, Situation
from lightning_actguard.engine import Engine
from lightning_actguard.param_groups import adopt_parameters, release_parameters
from lightning_actguard.revive import feeding_layer
from lightning_actguard.snapshot import WindowSnapshot
from lightning_actguard.swap import (
    Replacement,
    Selector,
    SwapReport,
    init_for_activation,
    reapply_swaps,
    swap_activations,
    swap_records,
)

#: What the guards swap to unless told otherwise, chosen by ``benchmarks/swap_choices.py`` (table
#: in the README): dead ReLU layers get ELU, whose negative side keeps a bounded gradient (the
#: only swap that brought back every run in that test; LeakyReLU(0.01) did no better than
#: ReLU); saturating activations whose gradients vanish get SELU, the only replacement that
#: trained a deep sigmoid net under both SGD and Adam without re-initialisation.
DEFAULT_SWAPS: dict[Selector, Replacement] = {
    nn.ReLU: nn.ELU,
    nn.ReLU6: nn.ELU,
    nn.Sigmoid: nn.SELU,
    nn.Tanh: nn.SELU,
    nn.Hardtanh: nn.SELU,
    nn.Hardsigmoid: nn.SELU,
    nn.Softsign: nn.SELU,
}

#: A swap has helped when the window loss fell by more than this fraction of the loss before it.
HELPED_MARGIN = 0.01


@dataclass
class _Standing:
    """A swap in place, and what is needed to judge and undo it."""

    step: int
    report: SwapReport
    loss_before: float | None
    reviewed: bool = False


@dataclass(frozen=True)
class Review:
    """The verdict on one swap, for the guard to publish as an event."""

    condition: str
    outcome: Outcome
    action: str


class ActivationSwapper:
    """Carries out a guard's swaps and reviews them.

    Args:
        mapping: module class or name pattern -> replacement, as for
            :func:`~lightning_actguard.swap.swap_activations`; ``None`` for :data:`DEFAULT_SWAPS`.
        all_layers: swap every layer the mapping matches, not only those the diagnosis names.
        init: re-initialise the weight layer feeding each swapped activation to suit the new
            activation (overwrites learned weights).
        review_steps: optimizer steps after a swap before judging it.
        revert_if_worse: undo a swap after which the loss rose.
        metric: the loss the review compares (``""`` for the loss ``training_step`` returns).
    """

    def __init__(
        self,
        mapping: Mapping[Selector, Replacement] | None,
        *,
        all_layers: bool,
        init: bool,
        review_steps: int,
        revert_if_worse: bool,
        metric: str = "",
    ) -> None:
        self.mapping = dict(mapping) if mapping is not None else dict(DEFAULT_SWAPS)
        # Validate the mapping now, at the point of entry, not at the first swap mid-run.
        swap_activations(nn.Sequential(nn.Identity()), self.mapping)
        self.all_layers = all_layers
        self.init = init
        self.review_steps = review_steps
        self.revert_if_worse = revert_if_worse
        self.metric = metric
        self._standing: list[_Standing] = []
        self._last_loss: float | None = None

    # ------------------------------------------------------------------ swapping

    def swap(self, situation: Situation, engine: Engine | None) -> Outcome:
        """Swap the activations ``situation`` names (or every match), on every rank alike."""
        trainer = situation.trainer
        model = trainer.lightning_module
        include = None if self.all_layers else {_module_name(name) for name in situation.layers}
        if include is not None and not include:
            return Outcome("warning", "nothing swapped: the diagnosis names no activation layer", changed=False)
        try:
            report = swap_activations(model, self.mapping, include=include)
        except Exception as error:
            # A user's factory failing mid-run must not end the run.
            failed = f"nothing swapped: building the replacement failed ({type(error).__name__}: {error})"
            return Outcome("warning", failed, changed=False)
        if not report:
            named = "the model" if include is None else ", ".join(repr(name) for name in sorted(include))
            return Outcome("warning", f"nothing swapped: no layer of {named} matches the swap mapping", changed=False)
        if trainer.world_size > 1 and report.new_parameters():
            report.undo(model)
            return Outcome(
                "warning",
                "nothing swapped: a learnable replacement cannot join distributed gradient synchronisation mid-run; "
                "map to a parameter-free activation",
                changed=False,
            )
        _follow(engine, report)
        adopt_parameters(model, trainer.optimizers, report.new_parameters())
        initialised = self._initialise(model, report) if self.init else []
        self._standing.append(_Standing(situation.step, report, self._last_loss))
        swapped = "; ".join(swap.describe() for swap in report.swaps)
        outcome = f"swapped {swapped}"
        if initialised:
            outcome += f"; re-initialised {', '.join(initialised)}"
        undo = (
            f"the swap is reviewed after {self.review_steps} steps; to undo it by hand, resume from a checkpoint "
            f"taken before step {situation.step}"
        )
        return Outcome("action", outcome, undo)

    def join_optimizers(self, trainer: pl.Trainer) -> None:
        """Give the optimizers the parameters of redone swaps, before a resumed optimizer state loads."""
        for standing in self._standing:
            adopt_parameters(trainer.lightning_module, trainer.optimizers, standing.report.new_parameters())

    def _initialise(self, model: nn.Module, report: SwapReport) -> list[str]:
        done = []
        for swap in report.swaps:
            feeding = feeding_layer(model, swap.name)
            if feeding is not None:
                scheme = init_for_activation(feeding[1], swap.new)
                if scheme is not None:
                    done.append(f"{feeding[0]!r} ({scheme})")
        return done

    # ------------------------------------------------------------------ reviewing

    def review(self, trainer: pl.Trainer, snapshot: WindowSnapshot, engine: Engine | None) -> list[Review]:
        """Judge the swaps whose review is due in this window; remember the window's loss."""
        window = snapshot.losses.get(self.metric)
        loss = None
        if window is not None and window.count + window.nonfinite:
            loss = window.mean if not window.nonfinite else math.inf
        self._last_loss = loss
        due = [s for s in self._standing if not s.reviewed and snapshot.step - s.step >= self.review_steps]
        return [self._judge(trainer, standing, loss, engine) for standing in due]

    def _judge(self, trainer: pl.Trainer, standing: _Standing, loss: float | None, engine: Engine | None) -> Review:
        standing.reviewed = True
        names = ", ".join(repr(swap.name) for swap in standing.report.swaps)
        before = standing.loss_before
        if loss is None or before is None:
            return Review(f"the swap of {names} at step {standing.step} cannot be judged: no loss", _info(), "review")
        change = f"loss {before:.4g} -> {loss:.4g}"
        if loss < before * (1 - HELPED_MARGIN):
            return Review(f"the swap of {names} at step {standing.step} helped ({change})", _info(), "review")
        worse = not loss <= before
        if worse and self.revert_if_worse:
            model = trainer.lightning_module
            standing.report.undo(model)
            release_parameters(trainer.optimizers, standing.report.new_parameters())
            _follow(engine, standing.report, backwards=True)
            self._standing.remove(standing)
            return Review(
                f"the swap of {names} at step {standing.step} made things worse ({change})",
                Outcome("action", f"reverted the swap of {names}; the weights keep what they learned since"),
                "revert_swap",
            )
        verdict = "made things worse" if worse else "did not help"
        return Review(
            f"the swap of {names} at step {standing.step} {verdict} ({change})",
            Outcome("warning", "kept the swap", changed=False),
            "review",
        )

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        """The swaps that stand, as plain data, with what their reviews need."""
        return {
            "standing": [
                {
                    "step": s.step,
                    "records": swap_records(s.report.swaps),
                    "loss_before": s.loss_before,
                    "reviewed": s.reviewed,
                }
                for s in self._standing
            ]
        }

    def redo(self, model: nn.Module, state: Mapping[str, Any], engine: Engine | None) -> None:
        """Redo the swaps of a checkpoint's :meth:`state` in ``model`` (before its weights load)."""
        self._standing = []
        for entry in state.get("standing", []):
            report = reapply_swaps(model, entry["records"])
            _follow(engine, report)
            self._standing.append(_Standing(entry["step"], report, entry["loss_before"], entry["reviewed"]))


def _follow(engine: Engine | None, report: SwapReport, *, backwards: bool = False) -> None:
    """Move the engine's hooks along with a swap (or its undoing)."""
    if engine is None or engine.activations is None:
        return
    for swap in report.swaps:
        old, new = (swap.new, swap.old) if backwards else (swap.old, swap.new)
        engine.activations.replace(old, new)


def _module_name(layer: str) -> str:
    """``'net.3[1]'`` (the second call of a reused module) -> ``'net.3'``."""
    return layer.split("[", 1)[0]


def _info() -> Outcome:
    return Outcome("info", "kept the swap", changed=False)


def restore_swaps(model: nn.Module, checkpoint: Mapping[str, Any]) -> SwapReport:
    """Redo in ``model`` the swaps the guards had made when ``checkpoint`` was saved.

    ``Trainer.fit(ckpt_path=...)`` does this by itself. Call it before loading the weights
    anywhere else, for instance to evaluate a swapped model::

        checkpoint = torch.load(path, weights_only=True)
        model = MyModel()
        restore_swaps(model, checkpoint)
        model.load_state_dict(checkpoint["state_dict"])

    Without it, a model whose swaps added parameters (PReLU) fails to load, and one whose swaps
    added none loads silently with its original activations.

    Returns:
        The swaps redone, from every guard in the checkpoint.
    """
    swaps = []
    for state in checkpoint.get("callbacks", {}).values():
        standing = state.get("swaps", {}).get("standing", []) if isinstance(state, Mapping) else []
        for entry in standing:
            swaps.extend(reapply_swaps(model, entry["records"]).swaps)
    return SwapReport(tuple(swaps))
