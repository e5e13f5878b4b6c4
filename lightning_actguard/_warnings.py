"""The package's warning category and a warn-once helper."""

from __future__ import annotations

import warnings


class ActGuardWarning(UserWarning):
    """Warnings from lightning-actguard; filter them with this category."""


class WarnOnce:
    """Emits each distinct message once per instance, so a per-step condition warns once."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, message: str, stacklevel: int = 2) -> None:
        """Warn with ``message`` unless it was already emitted."""
        if message in self._seen:
            return
        self._seen.add(message)
        warnings.warn(message, ActGuardWarning, stacklevel=stacklevel + 1)
