"""Lightning callbacks of lightning-actguard."""

from lightning_actguard.callbacks._guard import Guard
from lightning_actguard.callbacks._swapping import DEFAULT_SWAPS, restore_swaps
from lightning_actguard.callbacks.activation_monitor import ActivationMonitor
from lightning_actguard.callbacks.dead_relu_guard import DeadReLUGuard
from lightning_actguard.callbacks.finetune_guard import FinetuneGuard
from lightning_actguard.callbacks.gradient_monitor import GradientMonitor
from lightning_actguard.callbacks.loss_plateau_guard import LossPlateauGuard

__all__ = [
    "DEFAULT_SWAPS",
    "ActivationMonitor",
    "DeadReLUGuard",
    "FinetuneGuard",
    "GradientMonitor",
    "Guard",
    "LossPlateauGuard",
    "restore_swaps",
]
