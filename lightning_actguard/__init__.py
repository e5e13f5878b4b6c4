"""lightning-actguard: see inside a network while it trains, and catch it when it stops learning."""

from lightning_actguard._warnings import ActGuardWarning
from lightning_actguard.activations import ActivationSpec, find_activation_layers, spec_for
from lightning_actguard.callbacks import (
    ActivationMonitor,
    DeadReLUGuard,
    FinetuneGuard,
    GradientMonitor,
    LossPlateauGuard,
    restore_swaps,
)
from lightning_actguard.collector import ActivationCollector
from lightning_actguard.events import GuardEvent
from lightning_actguard.gradients import GradientCollector, GradientThresholds
from lightning_actguard.snapshot import ActivationStats, GradientLayerStats, GradientStats, WindowSnapshot
from lightning_actguard.summary import render_summary
from lightning_actguard.swap import SwapReport, swap_activations

__all__ = [
    "ActGuardWarning",
    "ActivationCollector",
    "ActivationMonitor",
    "ActivationSpec",
    "ActivationStats",
    "DeadReLUGuard",
    "FinetuneGuard",
    "GradientCollector",
    "GradientLayerStats",
    "GradientMonitor",
    "GradientStats",
    "GradientThresholds",
    "GuardEvent",
    "LossPlateauGuard",
    "SwapReport",
    "WindowSnapshot",
    "find_activation_layers",
    "render_summary",
    "restore_swaps",
    "spec_for",
    "swap_activations",
]

__version__ = "0.1.0"
