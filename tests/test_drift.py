"""DriftTracker and optimizer_membership on hand-built weights: known distances, known categories."""

import math

import pytest
import torch
from torch import nn

from lightning_actguard.drift import DriftTracker, optimizer_membership


def two_layers():
    """Layer "0": weight [[3, 0], [0, 4]] and bias (0, 0), norm 5. Layer "1": weight [[1, 2]] and bias (2,), norm 3."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        model[0].bias.zero_()
        model[1].weight.copy_(torch.tensor([[1.0, 2.0]]))
        model[1].bias.fill_(2.0)
    return model


@pytest.mark.parametrize("chunk_elements", [1, 5, 2**24], ids=["one-per-chunk", "split-layer", "one-chunk"])
def test_relative_drift_per_layer_has_known_values(chunk_elements):
    model = two_layers()
    tracker = DriftTracker(model, chunk_elements=chunk_elements)
    with torch.no_grad():
        model[0].weight[0, 0] += 0.3  # change of the weight 0.3
        model[0].bias.copy_(torch.tensor([0.4, 0.0]))  # change of the bias 0.4: layer change 0.5
        model[1].bias += 1.5  # layer change 1.5 over norm 3

    report = tracker.measure()

    assert report.layers == pytest.approx({"0": 0.5 / 5, "1": 1.5 / 3})
    assert report.changes == pytest.approx({"0.weight": 0.3, "0.bias": 0.4, "1.weight": 0.0, "1.bias": 1.5})
    assert report.unchanged() == ["1.weight"]
    assert report.unchanged({"0.weight", "1.bias"}) == []


def test_a_layer_that_started_at_zero_drifts_infinitely_and_a_nan_weight_shows():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    tracker = DriftTracker(model)
    assert tracker.measure().layers == {"(root)": 0.0}
    with torch.no_grad():
        model.weight[0, 1] = 1.0
    assert tracker.measure().layers == {"(root)": math.inf}
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    assert math.isnan(tracker.measure().layers["(root)"])


def test_the_reference_survives_a_round_trip_and_a_wrong_one_is_named():
    model = two_layers()
    reference = DriftTracker(model).reference_state()
    with torch.no_grad():
        model[1].weight += 1.0
    restored = DriftTracker(model, reference=reference)  # built after the change, measured from the start
    assert restored.measure().changes["1.weight"] == pytest.approx(math.sqrt(2))

    reference["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"`reference` must hold '0\.weight' of shape \(2, 2\), got of shape \(3, 3\)"):
        DriftTracker(model, reference=reference)


def test_pack_is_one_device_tensor_of_changes_then_reference_norms():
    model = two_layers()
    tracker = DriftTracker(model)
    (packed,) = tracker.pack()
    assert packed.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 5.0, 0.0, math.sqrt(5), 2.0])
    assert tracker.layers == ["0", "1"]


def test_membership_sorts_parameters_by_what_the_user_meant():
    model = nn.ModuleDict(
        {
            "frozen": nn.Linear(1, 1),
            "trained": nn.Linear(1, 1),
            "forgotten": nn.Linear(1, 1),
            "muddled": nn.Linear(1, 1),
        }
    )
    model["frozen"].requires_grad_(False)
    model["muddled"].requires_grad_(False)
    optimizer = torch.optim.SGD([*model["trained"].parameters(), *model["muddled"].parameters()], lr=0.1)

    membership = optimizer_membership(model, [optimizer])

    assert membership.trained == ["trained.weight", "trained.bias"]
    assert membership.frozen == ["frozen.weight", "frozen.bias"]
    assert membership.frozen_in_optimizer == ["muddled.weight", "muddled.bias"]
    assert membership.trainable_outside == ["forgotten.weight", "forgotten.bias"]
