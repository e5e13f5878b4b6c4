"""The training loss of one window, accumulated on the device.

A guard that watches the loss must not read it back every step (on a GPU each read stalls the
device). :class:`LossTracker` keeps each step's loss tensor (one number) where it is, and sums
the window's finite values and counts the non-finite ones only when the window is read back with
everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_actguard._packing import FlatReader, read_back

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
        self._values: list[Tensor] = []
        self._device: torch.device | None = None

    def add(self, loss: Tensor) -> None:
        """Keep one step's loss (any shape; its mean is used) on its device: no kernel, no read-back."""
        value = loss.detach()
        self._values.append(value if value.dim() == 0 else value.float().mean())
        self._device = value.device

    def pack(self) -> list[Tensor]:
        """The window's sum of finite losses and counts, for the engine's single read-back."""
        if self._device is None:
            return []
        if not self._values:
            return [torch.zeros(3, device=self._device)]
        values = torch.stack(self._values).float()
        finite = torch.isfinite(values)
        return [torch.stack((torch.where(finite, values, 0.0).sum(), finite.sum(), (~finite).sum())).float()]

    def unpack(self, take: FlatReader) -> LossWindow | None:
        """The window's loss from the reduced values of the last :meth:`pack`."""
        if self._device is None:
            return None
        total, count, nonfinite = take(3)
        return LossWindow(mean=total / count if count else math.nan, count=round(count), nonfinite=round(nonfinite))

    def reset(self) -> None:
        """Start a new window."""
        self._values.clear()

    def read(self) -> LossWindow | None:
        """Read back and reset in one go (for use without the engine)."""
        pieces = self.pack()
        if not pieces:
            return None
        window = self.unpack(read_back(pieces))
        self.reset()
        return window
