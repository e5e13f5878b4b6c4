"""Plain-words causes of a run that stopped learning, read from one window's statistics."""

from __future__ import annotations

from lightning_actguard.snapshot import WindowSnapshot

__all__ = ["DIAGNOSIS_LIMITS", "diagnose", "implicated_layers"]

#: Where each finding starts: share of dead units or saturated outputs in a layer, and the input
#: standard deviation above which a bounded activation is fed unnormalised inputs.
DIAGNOSIS_LIMITS = {"dead_frac": 0.5, "saturated_frac": 0.5, "input_std": 4.0}


def diagnose(snapshot: WindowSnapshot | None) -> list[str]:
    """The likely causes visible in ``snapshot``, most specific first.

    Looks for dead units, saturated sigmoid/tanh-like layers, unnormalised inputs into bounded
    activations and vanished gradients. With none of those, the learning rate may be too small.

    Example:
        >>> diagnose(None)
        ['no statistics yet (add ActivationMonitor or GradientMonitor to see causes)']
    """
    if snapshot is None:
        return ["no statistics yet (add ActivationMonitor or GradientMonitor to see causes)"]
    findings = []
    for name, layer in snapshot.activations.items():
        if layer.dead_frac > DIAGNOSIS_LIMITS["dead_frac"]:
            findings.append(
                f"{layer.dead_frac:.0%} of the units of {name!r} ({layer.kind}) are dead: a too-high learning "
                "rate kills ReLU units for good; lower it, or use LeakyReLU/ELU/SELU"
            )
        bounded = layer.saturated_frac is not None
        if bounded and layer.saturated_frac > DIAGNOSIS_LIMITS["saturated_frac"]:  # type: ignore[operator]
            findings.append(
                f"{layer.saturated_frac:.0%} of the outputs of {name!r} ({layer.kind}) are saturated: its gradient "
                "vanishes there; normalise what feeds it, or use a ReLU-family activation"
            )
        if bounded and layer.in_std > DIAGNOSIS_LIMITS["input_std"]:
            findings.append(
                f"the inputs of {name!r} ({layer.kind}) are unnormalised (std {layer.in_std:.3g}): normalise the "
                "data or add a normalisation layer before it"
            )
    if snapshot.gradients is not None and snapshot.gradients.vanishing:
        findings.append(snapshot.gradients.diagnosis)
    if not findings:
        findings.append("no dead, saturated or starved layer in sight: the learning rate may be too small")
    return findings


def implicated_layers(snapshot: WindowSnapshot | None) -> list[str]:
    """The activation layers behind :func:`diagnose`'s findings, in the snapshot's order.

    Layers with dead units, saturated outputs or unnormalised inputs past
    :data:`DIAGNOSIS_LIMITS`; and when gradients vanish, every layer bounded on both sides
    (sigmoid, tanh, ...), whose derivative of at most 1 (a quarter for sigmoid) shrinks the
    gradient at each layer it passes.
    """
    if snapshot is None:
        return []
    vanishing = snapshot.gradients is not None and snapshot.gradients.vanishing
    names = []
    for name, layer in snapshot.activations.items():
        bounded = layer.saturated_frac is not None
        if (
            layer.dead_frac > DIAGNOSIS_LIMITS["dead_frac"]
            or (bounded and layer.saturated_frac > DIAGNOSIS_LIMITS["saturated_frac"])  # type: ignore[operator]
            or (bounded and layer.in_std > DIAGNOSIS_LIMITS["input_std"])
            or (bounded and vanishing)
        ):
            names.append(name)
    return names
