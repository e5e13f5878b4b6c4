"""Many small device buffers in one flat tensor, so a window costs one reduction and one copy."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

ReduceSum = Callable[[Tensor], Tensor]


class FlatReader:
    """Hands out consecutive slices of a flat tensor, in the order the pieces were packed."""

    def __init__(self, flat: Tensor) -> None:
        self.flat, self.offset = flat, 0

    def __call__(self, length: int) -> Tensor:
        """The next ``length`` values."""
        piece = self.flat[self.offset : self.offset + length]
        self.offset += length
        return piece
