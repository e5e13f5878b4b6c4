"""The training loss of one window, accumulated on the device.

A guard that watches the loss must not read it back every step (on a GPU each read stalls the
device). :class:`LossTracker` adds each step's loss to a device buffer, counting non-finite
values apart, and is read back with everything else once per window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_actguard._packing import FlatReader

__all__ = ["LossTracker", "LossWindow"]


@dataclass(frozen=True)
class LossWindow:
    """The loss over one window (summed across processes under distributed training).

    Attributes:
        mean: mean of the finite losses; NaN when there were none.
        count: number of finite losses.
        nonfinite: number of NaN or infinite losses.
    """

    mean: float
    count: int
    nonfinite: int


class LossTracker:
    """Running sum of finite losses and a count of non-finite ones.

    Example:
        >>> tracker = LossTracker()
        >>> for value in (1.0, 3.0, float("nan")):
        ...     tracker.add(torch.tensor(value))
        >>> tracker.read()
        LossWindow(mean=2.0, count=2, nonfinite=1)
    """

    def __init__(self) -> None:
        self._totals: Tensor | None = None

    def add(self, loss: Tensor) -> None:
        """Add one step's loss (any shape; its mean is used) without reading it back."""
        value = loss.detach().float().mean()
        finite = torch.isfinite(value)
        step = torch.stack((torch.where(finite, value, 0.0), finite.float(), (~finite).float()))
        if self._totals is None or self._totals.device != step.device:
            self._totals = torch.zeros(3, device=step.device)
        self._totals.add_(step)

    def pack(self) -> list[Tensor]:
        """The window's buffer, for the engine's single read-back."""
        return [] if self._totals is None else [self._totals]

    def unpack(self, take: FlatReader) -> LossWindow | None:
        """The window's loss from the reduced values of the last :meth:`pack`."""
        if self._totals is None:
            return None
        total, count, nonfinite = take(3)
        return LossWindow(mean=total / count if count else math.nan, count=round(count), nonfinite=round(nonfinite))

    def reset(self) -> None:
        """Start a new window."""
        if self._totals is not None:
            self._totals.zero_()

    def read(self) -> LossWindow | None:
        """Read back and reset in one go (for use without the engine)."""
        pieces = self.pack()
        if not pieces:
            return None
        window = self.unpack(FlatReader(pieces[0].cpu()))
        self.reset()
        return window
