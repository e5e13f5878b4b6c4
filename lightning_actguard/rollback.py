"""One point to roll a training run back to: model weights, optimizer and scheduler states, and the step.

Plain PyTorch. :class:`RollbackPoint` holds at most one :class:`TrainingState`; capturing a new
one replaces the old, so the memory it takes stays that of one copy of the model's state
(parameters and buffers) plus the optimizers' state (for Adam, two more tensors the size of each
parameter). The copy is kept in CPU memory, or in one file written atomically (a temporary file,
then a rename), for models whose copy would not fit in memory.

Capturing copies every tensor to the host: on a GPU that waits for the device's queued work, so
it belongs on a chosen interval, not on every step. Restoring writes everything back into the
objects the training loop already holds (the model's parameters in place, the optimizer's own
``param_groups`` and ``state`` containers, the schedulers' attributes), so references held
elsewhere (a trainer, an optimizer wrapper, an LR scheduler) stay valid.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RollbackPoint", "TrainingState", "capture_state", "restore_state"]


@dataclass(frozen=True)
class TrainingState:
    """A copy of everything a rollback puts back, with every tensor on the CPU.

    Attributes:
        step: the optimizer step the state was taken at.
        model: the model's ``state_dict()`` (parameters and persistent buffers).
        optimizers: each optimizer's ``state_dict()``, in order.
        schedulers: each LR scheduler's ``state_dict()``, in order.
    """

    step: int
    model: dict[str, Tensor]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the state holds."""
        return _tensor_bytes([self.model, self.optimizers, self.schedulers])

    def to_dict(self) -> dict[str, Any]:
        """Plain containers, for ``torch.save``."""
        return {"step": self.step, "model": self.model, "optimizers": self.optimizers, "schedulers": self.schedulers}


def capture_state(
    step: int, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]
) -> TrainingState:
    """Copy the training state to the CPU. Later in-place updates of the training do not reach the copy.

    Args:
        step: the current optimizer step, kept with the state.
        model: the model whose parameters and buffers to copy.
        optimizers: the optimizers whose state (moments, momentum, param group settings) to copy.
        schedulers: the LR schedulers (anything with ``state_dict``) whose state to copy.

    Returns:
        The copy.
    """
    return TrainingState(
        step=step,
        model=_host_copy(model.state_dict()),
        optimizers=[_host_copy(optimizer.state_dict()) for optimizer in optimizers],
        schedulers=[_host_copy(scheduler.state_dict()) for scheduler in schedulers],
    )


def restore_state(
    state: TrainingState,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
) -> None:
    """Put ``state`` back into the live objects, exactly, each tensor onto its current device.

    ``state`` itself is not modified or shared: restoring twice gives the same result.

    Raises:
        ValueError: the numbers of optimizers or schedulers differ from those captured.
    """
    if len(optimizers) != len(state.optimizers) or len(schedulers) != len(state.schedulers):
        raise ValueError(
            f"the state was captured with {len(state.optimizers)} optimizer(s) and {len(state.schedulers)} "
            f"scheduler(s), got {len(optimizers)} and {len(schedulers)}."
        )
    model.load_state_dict(state.model)  # copies into the existing tensors, on their devices
    for optimizer, saved in zip(optimizers, state.optimizers, strict=True):
        _load_optimizer_in_place(optimizer, _host_copy(saved))
    for scheduler, saved in zip(schedulers, state.schedulers, strict=True):
        scheduler.load_state_dict(_host_copy(saved))


class RollbackPoint:
    """The one training state a run can return to, in CPU memory or in one file.

    Args:
        path: a file to keep the state in; ``None`` keeps it in CPU memory.
        write: whether this process writes the file (under distributed training only rank zero
            does; the others read what it wrote). Ignored without ``path``.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> point = RollbackPoint()
        >>> point.capture(0, model, [optimizer], [])
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(7.0)
        >>> point.restore(model, [optimizer], [])
        0
        >>> bool((model.weight == 7.0).any())
        False
    """

    def __init__(self, path: str | Path | None = None, *, write: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.write = write
        self._state: TrainingState | None = None
        self._step: int | None = None
        self._nbytes = 0

    @property
    def step(self) -> int | None:
        """The step of the state held, or ``None`` before the first capture."""
        return self._step

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the state held (in memory or in the file)."""
        return self._nbytes

    def capture(
        self, step: int, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]
    ) -> None:
        """Replace the state held by the current one (see :func:`capture_state`).

        A process that keeps the state in a file it does not write only records the step.
        """
        self._step = step
        if self.path is not None and not self.write:
            return
        state = capture_state(step, model, optimizers, schedulers)
        self._nbytes = state.nbytes
        if self.path is None:
            self._state = state
        else:
            _save_atomically(state.to_dict(), self.path)

    def restore(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any]) -> int:
        """Put the state held back into the live objects (see :func:`restore_state`).

        Returns:
            The step the state was captured at.

        Raises:
            RuntimeError: nothing was captured yet.
        """
        state = self._load()
        restore_state(state, model, optimizers, schedulers)
        return state.step

    def _load(self) -> TrainingState:
        if self._step is None:
            raise RuntimeError("RollbackPoint.restore() called before any capture().")
        if self.path is None:
            return self._state  # type: ignore[return-value]
        # Our own file, written by this run: it holds scheduler states, which are arbitrary objects.
        values = torch.load(self.path, map_location="cpu", weights_only=False)
        return TrainingState(**values)


def _host_copy(value: Any) -> Any:
    """A deep copy with every tensor copied to the CPU (a copy even when it is there already)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(item) for item in value)
    return copy.deepcopy(value)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _load_optimizer_in_place(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict``, then the loaded values moved back into the original containers.

    ``load_state_dict`` builds a new ``param_groups`` list, new group dicts and a new ``state``;
    whoever held the old ones (an optimizer wrapper, a scheduler comparing groups) would keep
    reading stale learning rates.
    """
    groups, state = optimizer.param_groups, optimizer.state
    optimizer.load_state_dict(saved)
    for old, new in zip(groups, optimizer.param_groups, strict=True):
        if old is not new:
            old.clear()
            old.update(new)
    if state is not optimizer.state:
        state.clear()
        state.update(optimizer.state)
    optimizer.param_groups, optimizer.state = groups, state


def _save_atomically(values: dict[str, Any], path: Path) -> None:
    """Write to a temporary file next to ``path``, then rename it: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(values, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
