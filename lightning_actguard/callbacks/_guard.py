"""The base of every guard: judge each window, climb an escalation ladder, record what was done."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from rich.table import Table
from typing_extensions import override

from lightning_actguard import _compat
from lightning_actguard._warnings import ActGuardWarning
from lightning_actguard.callbacks._actions import ACTIONS, Outcome, Situation
from lightning_actguard.callbacks._engine_callback import EngineCallback, check_positive_int
from lightning_actguard.callbacks._swapping import ActivationSwapper
from lightning_actguard.events import EventLog, GuardEvent
from lightning_actguard.snapshot import WindowSnapshot
from lightning_actguard.summary import print_summary
from lightning_actguard.swap import Replacement, Selector

_SEVERITY_LEVEL = {"info": 0.0, "warning": 1.0, "action": 2.0, "stop": 3.0}


@dataclass(frozen=True)
class Finding:
    """A condition a guard found in a window, with the numbers behind it."""

    condition: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    diagnosis: str = ""
    layers: tuple[str, ...] = ()


class Guard(EngineCallback):
    """Judges each window's statistics, reduced across processes, and acts when a condition holds.

    The actions form an escalation ladder: the first time the condition holds the guard takes the
    first action, and if the condition still holds ``cooldown`` steps later, the next one. Once
    the condition clears, the ladder starts again from the bottom. The last action repeats while
    the condition holds only if it is ``reduce_lr``; a warning, a swap or a stop is taken once.

    The ``"swap"`` action replaces the activations the finding names (see
    :func:`~lightning_actguard.swap.swap_activations`), then judges the swap ``review_steps``
    later by the window loss: it reports whether the swap helped and, with
    ``revert_if_worse``, undoes a swap after which the loss rose. A checkpoint records the swaps
    that stand; resuming from it redoes them in the freshly built model before its weights load.
    To load such a checkpoint outside ``Trainer.fit``, call
    :func:`~lightning_actguard.restore_swaps` on the model first.

    Args:
        action: an action name or a ladder of them: ``"warn"``, ``"reduce_lr"``, ``"swap"``,
            ``"stop"``.
        every_n_steps: window length in optimizer steps; ``None`` uses ``log_every_n_steps``.
        factor: ``reduce_lr`` multiplies every learning rate by this, in (0, 1).
        min_lr: ``reduce_lr`` never goes below this.
        cooldown: optimizer steps after an action before the guard acts again; ``None`` for the
            guard's default.
        print_summary: print the guard's events at the end of training (rank zero).
        swap_mapping: what ``"swap"`` replaces with what, as for
            :func:`~lightning_actguard.swap.swap_activations`; ``None`` for
            :data:`~lightning_actguard.callbacks.DEFAULT_SWAPS` (ReLU -> ELU,
            Sigmoid/Tanh-like -> SELU).
        swap_all: swap every layer the mapping matches, not only the layers the finding names.
        swap_init: re-initialise the weight layer feeding each swapped activation to suit the
            new one (LeCun-normal for SELU, Kaiming for the ReLU family). Off by default: it
            overwrites learned weights.
        review_steps: optimizer steps after a swap before judging it; ``None`` for the cooldown.
        revert_if_worse: undo a swap when the loss is higher ``review_steps`` later.
    """

    def __init__(
        self,
        *,
        action: str | Sequence[str],
        every_n_steps: int | None = None,
        factor: float = 0.5,
        min_lr: float = 0.0,
        cooldown: int | None = None,
        print_summary: bool = True,
        swap_mapping: Mapping[Selector, Replacement] | None = None,
        swap_all: bool = False,
        swap_init: bool = False,
        review_steps: int | None = None,
        revert_if_worse: bool = True,
    ) -> None:
        super().__init__(every_n_steps)
        ladder = (action,) if isinstance(action, str) else tuple(action)
        unknown = [name for name in ladder if name not in ACTIONS]
        if not ladder or unknown:
            raise ValueError(f"`action` must be one of {tuple(ACTIONS)} or a sequence of them, got {action!r}.")
        if not 0 < factor < 1:
            raise ValueError(f"`factor` must be in (0, 1), got {factor!r}.")
        if not min_lr >= 0:
            raise ValueError(f"`min_lr` must be a non-negative number, got {min_lr!r}.")
        if cooldown is not None and (not isinstance(cooldown, int) or isinstance(cooldown, bool) or cooldown < 0):
            raise ValueError(f"`cooldown` must be a non-negative int or None, got {cooldown!r}.")
        check_positive_int("review_steps", review_steps, allow_none=True)
        if swap_mapping is not None and "swap" not in ladder:
            raise ValueError(f"`swap_mapping` is given but `action` {action!r} has no 'swap' in it.")
        self.actions = ladder
        self.review_steps = review_steps
        self._swapper = (
            ActivationSwapper(
                swap_mapping,
                all_layers=swap_all,
                init=swap_init,
                review_steps=review_steps or 1,
                revert_if_worse=revert_if_worse,
            )
            if "swap" in ladder
            else None
        )
        self._resume_hook: Callable[[dict[str, Any]], None] | None = None
        self.factor = factor
        self.min_lr = min_lr
        self.cooldown = cooldown
        self.print_summary = print_summary
        self.events: list[GuardEvent] = []
        self._rung = 0
        self._last_action_step: int | None = None
        self._event_log: EventLog | None = None
        self._state_key: str | None = None

    # ------------------------------------------------------------------ for subclasses

    def inspect(self, trainer: pl.Trainer, snapshot: WindowSnapshot) -> Finding | None:
        """Return what is wrong in this window, or ``None`` when the condition does not hold."""
        raise NotImplementedError

    def default_cooldown(self, window: int) -> int:
        """Steps to wait between actions when ``cooldown`` is not given."""
        return window

    def guard_state(self) -> dict[str, Any]:
        """The subclass's own checkpointed state."""
        return {}

    def load_guard_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`guard_state`."""

    # ------------------------------------------------------------------ deciding and acting

    def loss_metric(self) -> str:
        """The loss a swap is judged by: ``""`` for what ``training_step`` returns."""
        return ""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self._swapper is None or self._engine is None:
            return
        self._swapper.metric = self.loss_metric()
        self._swapper.review_steps = self.review_steps or self._cooldown(trainer)
        self._engine.use_loss(self._swapper.metric or None)
        self._arm_resume(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._swapper is not None:
            # After the optimizers exist and before a resumed optimizer state loads into them.
            self._swapper.join_optimizers(trainer)
        # Every rank asks (Lightning broadcasts the directory); only rank zero writes.
        self._event_log = EventLog(log_dir_of(trainer))

    def _cooldown(self, trainer: pl.Trainer) -> int:
        return self.cooldown if self.cooldown is not None else self.default_cooldown(self.window_length(trainer))

    @override
    def on_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: WindowSnapshot) -> None:
        if self._swapper is not None:
            for review in self._swapper.review(trainer, snapshot, self._engine):
                self._record_event(trainer, snapshot.step, Finding(review.condition), review.action, review.outcome)
        finding = self.inspect(trainer, snapshot)
        if finding is None:
            self._rung = 0
            return
        if self._last_action_step is not None and snapshot.step - self._last_action_step < self._cooldown(trainer):
            return
        if self._rung >= len(self.actions) and self.actions[-1] != "reduce_lr":
            return
        name = self.actions[min(self._rung, len(self.actions) - 1)]
        situation = Situation(
            trainer,
            type(self).__name__,
            snapshot.step,
            finding.condition,
            self.factor,
            self.min_lr,
            layers=finding.layers,
            swapper=self._swap if self._swapper is not None else None,
        )
        outcome = ACTIONS[name](situation)
        self._rung += 1
        self._last_action_step = snapshot.step
        self._record_event(trainer, snapshot.step, finding, name, outcome)

    def _swap(self, situation: Situation) -> Outcome:
        return self._swapper.swap(situation, self._engine)  # type: ignore[union-attr]

    def _record_event(self, trainer: pl.Trainer, step: int, finding: Finding, action: str, outcome: Outcome) -> None:
        event = GuardEvent(
            step=step,
            guard=type(self).__name__,
            severity=outcome.severity,
            condition=finding.condition,
            evidence=dict(finding.evidence),
            diagnosis=finding.diagnosis,
            action=action,
            outcome=outcome.outcome,
            undo=outcome.undo,
        )
        self.events.append(event)
        publish_event(trainer, event, self._event_log)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.print_summary and self.events:
            rank_zero_only(print_summary)(events_table(type(self).__name__, self.events))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._disarm_resume(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._disarm_resume(pl_module)

    # ------------------------------------------------------------------ redoing swaps on resume

    def _arm_resume(self, pl_module: pl.LightningModule) -> None:
        """Make the module redo this guard's recorded swaps when a checkpoint loads into it.

        Lightning loads a checkpoint's weights right after the module's ``on_load_checkpoint``
        and before any callback state, so that hook is the one place where the model can still
        be given the structure the weights were saved with.
        """
        if self._resume_hook is not None:
            return
        original = pl_module.on_load_checkpoint

        def redo_swaps_then_load(checkpoint: dict[str, Any]) -> None:
            state = checkpoint.get("callbacks", {}).get(self.state_key, {})
            if self._swapper is not None and state.get("swaps"):
                self._swapper.redo(pl_module, state["swaps"], self._engine)
            original(checkpoint)

        self._resume_hook = redo_swaps_then_load
        pl_module.on_load_checkpoint = redo_swaps_then_load  # type: ignore[method-assign]

    def _disarm_resume(self, pl_module: pl.LightningModule) -> None:
        if self._resume_hook is not None and pl_module.__dict__.get("on_load_checkpoint") is self._resume_hook:
            del pl_module.on_load_checkpoint
        self._resume_hook = None

    # ------------------------------------------------------------------ checkpoints

    @property
    @override
    def state_key(self) -> str:
        # Lightning asks for it around every hook call: build it once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(action=self.actions, **self.identity())
        return self._state_key

    def identity(self) -> dict[str, Any]:
        """The arguments that tell two guards of the same class apart in a checkpoint."""
        return {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "rung": self._rung,
            "last_action_step": self._last_action_step,
            "events": [event.to_dict() for event in self.events],
            "guard": self.guard_state(),
            "swaps": self._swapper.state() if self._swapper is not None else {},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rung = state_dict.get("rung", 0)
        self._last_action_step = state_dict.get("last_action_step")
        self.events = [GuardEvent.from_dict(values) for values in state_dict.get("events", [])]
        self.load_guard_state(state_dict.get("guard", {}))


def publish_event(trainer: pl.Trainer, event: GuardEvent, event_log: EventLog | None) -> None:
    """Warn (rank zero) with the event's condition, diagnosis and action, and record it everywhere it belongs."""
    message = f"{event.guard} at step {event.step}: {event.condition}."
    if event.diagnosis:
        message += f" Diagnosis: {event.diagnosis}."
    if event.action != "warn":
        message += f" Action: {event.outcome}."
    rank_zero_warn(message, category=ActGuardWarning)
    _record(trainer, event, event_log)


@rank_zero_only
def _record(trainer: pl.Trainer, event: GuardEvent, event_log: EventLog | None) -> None:
    """Write an event everywhere it belongs: the loggers, TensorBoard's Text tab, the JSON-lines log."""
    step = _compat.logger_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics({f"guard_event/{event.guard}": _SEVERITY_LEVEL[event.severity]}, step=step)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(f"guard_events/{event.guard}", event.markdown(), global_step=step)
        logger.save()
    if event_log is not None:
        event_log.append(event)


def events_table(guard: str, events: Sequence[GuardEvent]) -> Table:
    """One row per event: step, action, what was seen and what was done."""
    table = Table(title=f"{guard}: {len(events)} event(s)")
    table.add_column("step", justify="right")
    table.add_column("action")
    table.add_column("condition")
    table.add_column("outcome")
    for event in events:
        table.add_row(str(event.step), event.action, event.condition, event.outcome)
    return table


def log_dir_of(trainer: pl.Trainer) -> Path:
    """Where the event log goes: the logger's directory, else the trainer's root directory."""
    return Path(trainer.log_dir or trainer.default_root_dir)
