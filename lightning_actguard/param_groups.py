"""Hand parameters created mid-training (a swapped-in PReLU's slopes) to the optimizers, and take them back.

A new parameter joins the param group of the parameter just before it in ``model.parameters()``
order, right after it. A model whose optimizer is built from ``self.parameters()`` then has
the same parameter order as a fresh optimizer built after the same swap, which is what makes
an optimizer state saved after the swap load into a resumed run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["adopt_parameters", "release_parameters"]


def adopt_parameters(
    model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], params: Iterable[nn.Parameter]
) -> list[str]:
    """Add ``params`` to the param group that trains their nearest preceding neighbour in ``model``.

    A parameter with no trained neighbour before it joins the group of the first trained one
    after it, or else the first group of the first optimizer. It takes that group's learning
    rate and settings, and its optimizer state starts empty, as for any parameter before its
    first step.

    Returns:
        One line per parameter saying where it went (``"net.3.weight -> optimizer 0 group 0"``).
    """
    new = {id(param) for param in params}
    if not new or not optimizers:
        return []
    order = list(model.named_parameters())
    placed = []
    for index, (name, param) in enumerate(order):
        if id(param) not in new or _owner(optimizers, param) is not None:
            continue
        placement = _next_to_trained_neighbour(optimizers, order, index)
        if placement is None:
            optimizer_index, group_index, position = 0, 0, len(optimizers[0].param_groups[0]["params"])
        else:
            optimizer_index, group_index, position = placement
        optimizers[optimizer_index].param_groups[group_index]["params"].insert(position, param)
        placed.append(f"{name} -> optimizer {optimizer_index} group {group_index}")
    return placed


def release_parameters(optimizers: Sequence[torch.optim.Optimizer], params: Iterable[nn.Parameter]) -> None:
    """Remove ``params`` and their state from every optimizer (the swap that made them was undone)."""
    gone = {id(param) for param in params}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [param for param in group["params"] if id(param) not in gone]
        for param in [param for param in optimizer.state if id(param) in gone]:
            del optimizer.state[param]


def _next_to_trained_neighbour(
    optimizers: Sequence[torch.optim.Optimizer], order: list[tuple[str, nn.Parameter]], index: int
) -> tuple[int, int, int] | None:
    """Where a new parameter goes: after the nearest trained parameter before it, else before the next one."""
    before = [(param, 1) for _, param in reversed(order[:index])]
    after = [(param, 0) for _, param in order[index + 1 :]]
    for neighbour, offset in before + after:
        owner = _owner(optimizers, neighbour)
        if owner is not None:
            group_params = optimizers[owner[0]].param_groups[owner[1]]["params"]
            return owner[0], owner[1], _index_of(group_params, neighbour) + offset
    return None


def _owner(optimizers: Sequence[torch.optim.Optimizer], param: nn.Parameter) -> tuple[int, int] | None:
    for optimizer_index, optimizer in enumerate(optimizers):
        for group_index, group in enumerate(optimizer.param_groups):
            if any(p is param for p in group["params"]):
                return optimizer_index, group_index
    return None


def _index_of(params: Sequence[nn.Parameter], param: nn.Parameter) -> int:
    return next(index for index, candidate in enumerate(params) if candidate is param)
