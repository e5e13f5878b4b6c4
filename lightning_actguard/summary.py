"""A per-layer table of one window, for the terminal."""

from __future__ import annotations

import io
import math

from rich.console import Console
from rich.table import Table

from lightning_actguard.snapshot import ActivationSnapshot

__all__ = ["render_summary", "summary_table"]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "nan"
    return f"{mean:+.3g} ± {std:.3g}"


def summary_table(snapshot: ActivationSnapshot) -> Table:
    """One row per layer: dead units, zero and saturated shares, output and input statistics."""
    table = Table(title=f"Activations at step {snapshot.step} (last {snapshot.batches} batches)")
    for column in ("layer", "kind", "units", "dead", "zero", "saturated", "output", "input", "non-finite"):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for layer in snapshot.layers.values():
        table.add_row(
            layer.name,
            layer.kind,
            str(layer.units),
            _percent(layer.dead_frac),
            _percent(layer.zero_frac),
            _percent(layer.saturated_frac),
            _mean_std(layer.out_mean, layer.out_std),
            _mean_std(layer.in_mean, layer.in_std),
            str(layer.nonfinite),
        )
    return table


def render_summary(snapshot: ActivationSnapshot, width: int = 120) -> str:
    """The table of :func:`summary_table` as plain text."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(summary_table(snapshot))
    return buffer.getvalue()
