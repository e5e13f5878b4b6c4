"""A per-layer table of one window, for the terminal."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from lightning_actguard.snapshot import GradientStats, WindowSnapshot

__all__ = ["gradient_table", "print_summary", "render_summary", "summary_table"]

_MIN_WIDTH = 120


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float) -> str:
    return f"{value:.3g}"


def summary_table(snapshot: WindowSnapshot) -> Table:
    """One row per layer: dead units, zero and saturated shares, output and input statistics."""
    title = f"Activations over the last {snapshot.batches} training batches, to optimizer step {snapshot.step}"
    table = Table(title=title)
    table.add_column("layer", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    for column in ("units", "dead", "zero", "saturated", "out mean", "out std", "in mean", "in std", "non-finite"):
        table.add_column(column, justify="right", no_wrap=True)
    for layer in snapshot.activations.values():
        table.add_row(
            layer.name,
            layer.kind,
            str(layer.units),
            _percent(layer.dead_frac),
            _percent(layer.zero_frac),
            _percent(layer.saturated_frac),
            _number(layer.out_mean),
            _number(layer.out_std),
            _number(layer.in_mean),
            _number(layer.in_std),
            str(layer.nonfinite),
        )
    return table


def gradient_table(gradients: GradientStats, step: int) -> Table:
    """One row per layer: gradient norm, update ratio and non-finite steps; the verdict in the caption."""
    table = Table(title=f"Gradients over the last {gradients.steps} optimizer steps, to step {step}")
    table.add_column("layer", no_wrap=True)
    for column in ("grad norm", "update ratio", "non-finite steps"):
        table.add_column(column, justify="right", no_wrap=True)
    for layer in gradients.layers.values():
        ratio = "-" if layer.update_ratio is None else _number(layer.update_ratio)
        table.add_row(layer.name, _number(layer.norm), ratio, str(layer.nonfinite_steps))
    depth = "-" if gradients.depth_ratio is None else _number(gradients.depth_ratio)
    verdict = gradients.diagnosis or "healthy"
    table.caption = f"global norm {_number(gradients.total_norm)}, first/last layer {depth}: {verdict}"
    table.caption_justify = "left"
    return table


def print_summary(table: Table, console: Console | None = None) -> None:
    """Print a table at least 120 columns wide (rich assumes 80 when output is not a terminal)."""
    console = console or Console()
    console.width = max(console.width, _MIN_WIDTH)
    console.print(table)


def render_summary(snapshot: WindowSnapshot) -> str:
    """The activation table of :func:`summary_table` as plain text."""
    buffer = io.StringIO()
    print_summary(summary_table(snapshot), Console(file=buffer, color_system=None))
    return buffer.getvalue()
