"""The fine-tuning health rules on hand-made windows, and the baseline measured on one batch."""

import math

import pytest
import torch
from torch import nn

from lightning_actguard.activations import find_activation_layers
from lightning_actguard.finetune_health import (
    Baseline,
    BaselineRecorder,
    HealthRules,
    canary_breach,
    drift_breaches,
    loss_spike,
    rates_above_cap,
    window_breaches,
)
from lightning_actguard.losses import LossWindow
from lightning_actguard.snapshot import ActivationStats, GradientLayerStats, GradientStats, WindowSnapshot


def layer(name, kind="relu", dead_frac=0.0, saturated_frac=None):
    return ActivationStats(
        name=name,
        kind=kind,
        units=10,
        dead_frac=dead_frac,
        zero_frac=dead_frac,
        saturated_frac=saturated_frac,
        out_mean=0.0,
        out_std=1.0,
        in_mean=0.0,
        in_std=1.0,
        nonfinite=0,
        dead_units=torch.arange(10) < round(10 * dead_frac),
    )


def window(layers=(), loss=None, nonfinite=0, gradient_nonfinite=0):
    losses = (
        {} if loss is None and not nonfinite else {"": LossWindow(mean=loss or math.nan, count=10, nonfinite=nonfinite)}
    )
    gradients = None
    if gradient_nonfinite:
        head = GradientLayerStats("head", norm=math.nan, nonfinite_steps=gradient_nonfinite, update_ratio=None)
        gradients = GradientStats({"head": head}, math.nan, 5, 0, gradient_nonfinite, None, False, True)
    return WindowSnapshot(
        step=10, batches=10, activations={item.name: item for item in layers}, losses=losses, gradients=gradients
    )


BASELINE = Baseline.from_layers([layer("act", dead_frac=0.2), layer("squash", "tanh", saturated_frac=0.1)], loss=0.5)


def kinds(snapshot, reference_loss=0.5, rules=None):
    found = window_breaches(
        snapshot, BASELINE, rules or HealthRules(), reference_loss, can_die=lambda stats: stats.kind == "relu"
    )
    return [breach.kind for breach in found]


def test_dead_units_trigger_only_above_the_baseline_plus_the_margin():
    assert kinds(window([layer("act", dead_frac=0.3)])) == []  # 0.2 + 0.1: not above
    assert kinds(window([layer("act", dead_frac=0.4)])) == ["dead_units"]
    assert kinds(window([layer("act", dead_frac=0.4)]), rules=HealthRules(dead_margin=None)) == []
    # A layer whose dead units mean nothing (here, judged by can_die) is not judged.
    assert kinds(window([layer("squash", "tanh", dead_frac=1.0, saturated_frac=0.1)])) == []


def test_saturation_triggers_above_the_baseline_plus_the_margin():
    assert kinds(window([layer("squash", "tanh", saturated_frac=0.3)])) == []
    assert kinds(window([layer("squash", "tanh", saturated_frac=0.35)])) == ["saturation"]


def test_the_condition_names_each_layer_with_its_numbers():
    (breach,) = window_breaches(
        window([layer("act", dead_frac=0.6)]), BASELINE, HealthRules(), None, can_die=lambda stats: True
    )
    assert breach.condition == "dead units rose more than 10% above the pretrained model's in 'act' 20% -> 60%"
    assert breach.evidence == {"act": {"pretrained": 0.2, "now": 0.6}}


@pytest.mark.parametrize(
    ("loss", "reference", "spike"),
    [(1.1, 0.5, True), (0.9, 0.5, False), (0.12, 0.05, False), (math.inf, 0.5, True), (-0.5, -1.0, True)],
    ids=["ratio-and-delta", "under-ratio", "under-delta", "infinite", "negative-reference"],
)
def test_loss_spike_rule(loss, reference, spike):
    assert loss_spike(loss, reference, ratio=2.0, min_delta=0.1) is spike


def test_loss_and_gradient_conditions():
    assert kinds(window(loss=1.2)) == ["loss_spike"]
    assert kinds(window(loss=1.2), reference_loss=None) == []
    assert kinds(window(loss=0.4, nonfinite=2)) == ["nonfinite_loss"]
    assert kinds(window(loss=0.4, gradient_nonfinite=1)) == ["nonfinite_gradient"]


def test_drift_and_canary_breaches():
    # "d" has no budget; a NaN drift (NaN weights) is over any budget.
    (breach,) = drift_breaches({"a": 0.05, "b": 0.2, "c": math.nan, "d": 9.0}, {"a": 0.1, "b": 0.1, "c": 0.1})
    assert list(breach.evidence["drift"]) == ["b", "c"]
    assert drift_breaches({"a": 0.1}, {"a": 0.1}) == []  # at the budget is within it
    baseline = Baseline.from_layers([], loss=None, canary_loss=0.3)
    assert canary_breach(0.8, baseline, HealthRules(canary_margin=0.5)) is None
    assert canary_breach(0.81, baseline, HealthRules(canary_margin=0.5)).kind == "canary"
    assert canary_breach(math.nan, baseline, HealthRules()).kind == "canary"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"dead_margin": 0.0}, r"`dead_margin` must be in \(0, 1\] or None, got 0.0"),
        ({"saturation_margin": 1.5}, r"`saturation_margin` must be in \(0, 1\] or None, got 1.5"),
        ({"loss_spike_ratio": 1.0}, "`loss_spike_ratio` must be a number greater than 1 or None, got 1.0"),
        ({"loss_spike_min_delta": -1}, "`loss_spike_min_delta` must be a non-negative number, got -1"),
        ({"canary_margin": math.nan}, "`canary_margin` must be a positive number or None, got nan"),
    ],
)
def test_rules_refuse_out_of_range_margins(arguments, message):
    with pytest.raises(ValueError, match=message):
        HealthRules(**arguments)


def test_the_recorder_measures_one_batch_pauses_for_backward_and_leaves_no_hook():
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([1.0, -1.0, -1.0, 2.0]))
    recorder = BaselineRecorder(find_activation_layers(model))
    model(torch.ones(3, 2))
    recorder.pause()
    with torch.no_grad():
        model[0].bias.fill_(1.0)
    model(torch.ones(3, 2))  # would make every unit fire if it were counted
    recorder.resume()

    baseline = recorder.finish(torch.tensor([2.0, 4.0]), canary_loss=0.7)

    assert baseline.dead_frac == {"1": 0.5}
    assert baseline.alive_units["1"].tolist() == [True, False, False, True]
    assert (baseline.loss, baseline.canary_loss) == (3.0, 0.7)
    assert not model[1]._forward_hooks
    assert not model[1]._forward_pre_hooks
    assert Baseline.from_dict(baseline.to_dict()).alive_units["1"].tolist() == [True, False, False, True]


def test_rates_above_cap_see_the_rate_a_warm_up_climbs_to():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert rates_above_cap([optimizer], cap=0.1) == [(0, 0, 1.0)]  # initial_lr, where the warm-up ends
    assert rates_above_cap([optimizer], cap=1.0) == []
