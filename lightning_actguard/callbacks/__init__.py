"""Lightning callbacks of lightning-actguard."""

from lightning_actguard.callbacks.activation_monitor import ActivationMonitor

__all__ = ["ActivationMonitor"]
