"""What a guard did, when and why: one record per action, kept, logged and written to a file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EVENT_LOG_NAME", "EventLog", "GuardEvent"]

#: File name of the JSON-lines event log in the run's log directory.
EVENT_LOG_NAME = "actguard_events.jsonl"


@dataclass(frozen=True)
class GuardEvent:
    """One action a guard took.

    Attributes:
        step: optimizer step at which the guard acted.
        guard: the guard's name.
        severity: ``"info"`` for a verdict that needs nothing done (a swap that helped),
            ``"warning"`` for a warning, ``"action"`` for a change to the run, ``"stop"``.
        condition: what the guard saw, in plain words.
        evidence: the numbers behind it (layer dead fractions, losses, learning rates).
        diagnosis: the likely cause and remedy, in plain words.
        action: the action's name (``"warn"``, ``"reduce_lr"``, ``"stop"``).
        outcome: what the action did (``"lowered lr of 1 group: 0.5 -> 0.25"``).
        undo: how to undo it.
    """

    step: int
    guard: str
    severity: str
    condition: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    diagnosis: str = ""
    action: str = ""
    outcome: str = ""
    undo: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready values."""
        return asdict(self) | {"evidence": dict(self.evidence)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GuardEvent:
        """Rebuild an event from :meth:`to_dict` (for instance from a checkpoint)."""
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**known)

    def markdown(self) -> str:
        """A short Markdown text for TensorBoard's Text tab."""
        lines = [f"**{self.guard}** at step {self.step}: {self.condition}"]
        if self.diagnosis:
            lines.append(f"*Diagnosis:* {self.diagnosis}")
        lines.append(f"*Action:* `{self.action}`: {self.outcome}")
        if self.undo:
            lines.append(f"*To undo:* {self.undo}")
        return "\n\n".join(lines)


class EventLog:
    """Appends events as JSON lines to ``directory / EVENT_LOG_NAME``.

    Example:
        >>> import tempfile
        >>> log = EventLog(tempfile.mkdtemp())
        >>> log.append(GuardEvent(step=3, guard="DeadReLUGuard", severity="warning", condition="c", action="warn"))
        >>> log.read()[0].step
        3
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / EVENT_LOG_NAME

    def append(self, event: GuardEvent) -> None:
        """Add one line; the directory is created when needed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(event.to_dict(), default=str) + "\n")

    def read(self) -> list[GuardEvent]:
        """Every event in the file, oldest first."""
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as file:
            return [GuardEvent.from_dict(json.loads(line)) for line in file if line.strip()]
