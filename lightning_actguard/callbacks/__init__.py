"""Lightning callbacks of lightning-actguard."""

from lightning_actguard.callbacks.activation_monitor import ActivationMonitor
from lightning_actguard.callbacks.gradient_monitor import GradientMonitor

__all__ = ["ActivationMonitor", "GradientMonitor"]
