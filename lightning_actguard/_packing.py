"""Many small device buffers in one flat tensor, so a window costs one reduction and one copy."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ReduceSum = Callable[[Tensor], Tensor]


class FlatReader:
    """Hands out consecutive runs of the values read back, in the order the pieces were packed.

    The values are a plain list: the flat tensor is turned into Python numbers once, so reading
    a window costs one device-to-host copy however many layers there are.
    """

    def __init__(self, flat: Tensor) -> None:
        self.values: list[float] = flat.tolist()
        self.offset = 0

    def __call__(self, length: int) -> list[float]:
        """The next ``length`` values."""
        piece = self.values[self.offset : self.offset + length]
        self.offset += length
        return piece


def host_to_device(values: list[float], device: torch.device) -> Tensor:
    """A small tensor of host numbers on ``device``, copied without waiting for the device's queued work."""
    host = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def read_back(pieces: list[Tensor], reduce_sum: ReduceSum | None = None) -> FlatReader:
    """Concatenate ``pieces`` on the first one's device, reduce once, and copy to the host once."""
    device = pieces[0].device
    flat = torch.cat([piece.to(device) for piece in pieces])
    if reduce_sum is not None:
        flat = reduce_sum(flat)
    return FlatReader(flat.cpu())
