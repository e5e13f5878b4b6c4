import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from lightning_actguard import ActGuardWarning, _stats
from lightning_actguard.activations import find_activation_layers, spec_for
from lightning_actguard.collector import ActivationCollector


def collect(model, *batches, collector=None, **kwargs):
    """Run ``batches`` through ``model`` as one window and return its stats by layer name."""
    collector = collector or ActivationCollector(**kwargs)
    collector.attach(find_activation_layers(model))
    for batch in batches:
        collector.start_batch()
        model(batch)
        collector.end_batch()
    stats = {layer.name: layer for layer in collector.read()}
    collector.detach()
    return stats


def half_dead_relu():
    """Linear with zero weights: units with bias -1 never fire, units with bias +1 always output 1."""
    linear = nn.Linear(3, 6)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]))
    return nn.Sequential(linear, nn.ReLU())


def test_bias_that_kills_half_the_units_reports_half_dead():
    stats = collect(half_dead_relu(), torch.randn(16, 3), torch.randn(16, 3))["1"]
    assert stats.units == 6
    assert stats.dead_frac == 0.5
    assert stats.dead_units.tolist() == [False, True, False, True, False, True]
    assert stats.zero_frac == 0.5
    assert (stats.out_mean, stats.out_std) == pytest.approx((0.5, 0.5))
    assert (stats.in_mean, stats.in_std) == pytest.approx((0.0, 1.0))
    assert stats.saturated_frac is None
    assert stats.nonfinite == 0


def test_a_unit_that_fires_once_in_the_window_is_not_dead():
    model = nn.Sequential(nn.ReLU())
    quiet = -torch.ones(4, 2)
    once = torch.tensor([[-1.0, 5.0]])
    assert collect(model, quiet, quiet)["0"].dead_frac == 1.0
    assert collect(model, quiet, once, quiet)["0"].dead_frac == 0.5


def test_units_of_conv_outputs_are_channels():
    inputs = torch.randn(2, 4, 5, 5).abs()
    inputs[:, 2] = -inputs[:, 2]
    stats = collect(nn.Sequential(nn.ReLU()), inputs)["0"]
    assert stats.units == 4
    assert stats.dead_units.tolist() == [False, False, True, False]
    assert stats.zero_frac == 0.25


def test_unit_dim_override_for_conv1d_shaped_outputs():
    inputs = torch.ones(2, 3, 7)
    inputs[:, 0] = -1.0
    auto = collect(nn.Sequential(nn.ReLU()), inputs)["0"]
    channels = collect(nn.Sequential(nn.ReLU()), inputs, unit_dim=1)["0"]
    assert (auto.units, auto.dead_frac) == (7, 0.0)
    assert (channels.units, channels.dead_frac) == (3, pytest.approx(1 / 3))


@pytest.mark.parametrize("activation", [nn.Sigmoid(), nn.Tanh(), nn.Hardtanh(), nn.Softsign()], ids=str)
def test_inputs_of_magnitude_100_saturate_a_bounded_activation(activation):
    inputs = torch.tensor([100.0, -100.0]).repeat(32, 4)
    stats = collect(nn.Sequential(activation), inputs)["0"]
    assert stats.saturated_frac == 1.0
    assert stats.in_std == pytest.approx(100.0)


def test_saturation_counts_outputs_within_eps_of_a_bound():
    # sigmoid outputs: 0.5, 0.995, 0.0067 and 0.98; with eps 0.01 the 2nd and 3rd are saturated.
    logits = torch.tensor([[0.0, 5.3, -5.0, 3.9]])
    stats = collect(nn.Sequential(nn.Sigmoid()), logits, saturation_eps=0.01)["0"]
    assert stats.saturated_frac == 0.5


def test_zero_share_of_a_floorless_activation_counts_exact_zeros_only():
    inputs = torch.tensor([[0.0, -1.0, 2.0, 0.0]])
    assert collect(nn.Sequential(nn.LeakyReLU()), inputs)["0"].zero_frac == 0.5
    assert collect(nn.Sequential(nn.ReLU()), inputs)["0"].zero_frac == 0.75


def test_zero_share_of_elu_counts_outputs_at_its_floor():
    inputs = torch.tensor([[-100.0, -0.5, 1.0, 2.0]])  # ELU(-100) is exactly -alpha in float32
    stats = collect(nn.Sequential(nn.ELU(alpha=1.0)), inputs)["0"]
    assert stats.zero_frac == 0.25
    assert stats.dead_units.tolist() == [True, False, False, False]  # unit 0 never rose above the floor


def test_nonfinite_outputs_are_counted():
    inputs = torch.tensor([[1.0, math.nan, 2.0], [math.inf, -math.inf, 3.0]])
    stats = collect(nn.Sequential(nn.ReLU()), inputs)["0"]
    assert stats.nonfinite == 2  # NaN and +inf; ReLU maps -inf to 0
    assert math.isnan(stats.out_mean)


def test_inplace_relu_reports_its_input_before_it_was_overwritten():
    inputs = torch.tensor([[-3.0, 1.0]])
    stats = collect(nn.Sequential(nn.ReLU(inplace=True)), inputs.clone())["0"]
    assert stats.in_mean == -1.0
    assert stats.out_mean == 0.5


class ReusesOneActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.narrow, self.wide = nn.Linear(2, 4), nn.Linear(4, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.wide(self.act(self.narrow(x))))


def test_a_module_called_twice_is_reported_per_call_position():
    stats = collect(ReusesOneActivation(), torch.randn(5, 2), torch.randn(5, 2))
    assert {name: layer.units for name, layer in stats.items()} == {"act[0]": 4, "act[1]": 8}


def test_calls_beyond_the_limit_are_skipped_with_one_warning():
    model = ReusesOneActivation()
    with pytest.warns(ActGuardWarning, match="ran more than 1 times in one batch"):
        stats = collect(model, torch.randn(5, 2), torch.randn(5, 2), max_calls_per_module=1)
    assert list(stats) == ["act"]


def test_only_batches_between_start_and_end_count_and_pause_skips_forwards():
    model = nn.Sequential(nn.ReLU())
    collector = ActivationCollector()
    collector.attach(find_activation_layers(model))
    model(torch.ones(3, 2))  # before any batch: ignored
    collector.start_batch()
    model(-torch.ones(3, 2))
    collector.pause()
    model(torch.ones(3, 2))  # e.g. a recomputation during backward
    collector.resume()
    collector.end_batch()
    model(torch.ones(3, 2))  # validation after the batch: ignored
    (stats,) = collector.read()
    assert stats.dead_frac == 1.0
    assert collector.batches == 0
    collector.detach()


def test_read_starts_a_new_window():
    model = nn.Sequential(nn.ReLU())
    collector = ActivationCollector()
    collector.attach(find_activation_layers(model))
    collector.start_batch()
    model(-torch.ones(3, 2))
    collector.end_batch()
    assert collector.read()[0].dead_frac == 1.0
    collector.start_batch()
    model(torch.ones(3, 2))
    collector.end_batch()
    (second,) = collector.read()
    assert (second.dead_frac, second.out_mean) == (0.0, 1.0)
    collector.detach()


def test_read_reduces_all_layers_in_one_call():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4), nn.Tanh())
    calls = []

    def fake_two_ranks(flat):
        calls.append(flat.shape)
        return flat * 2

    collector = ActivationCollector()
    collector.attach(find_activation_layers(model))
    collector.start_batch()
    model(torch.randn(6, 2))
    collector.end_batch()
    stats = collector.read(fake_two_ranks)
    assert len(calls) == 1
    assert [layer.units for layer in stats] == [3, 4]
    collector.detach()


def test_bfloat16_activations_accumulate_in_float32():
    inputs = torch.randn(256, 16)
    expected = collect(nn.Sequential(nn.ReLU()), inputs)["0"]
    stats = collect(nn.Sequential(nn.ReLU()), inputs.bfloat16())["0"]
    assert stats.out_mean == pytest.approx(expected.out_mean, rel=1e-2)
    assert stats.zero_frac == expected.zero_frac


def test_histogram_buckets_match_torch_histogram():
    inputs = torch.randn(50, 20) * 3
    collector = ActivationCollector()
    model = nn.Sequential(nn.ReLU())
    collector.attach(find_activation_layers(model))
    collector.start_batch(histograms=True)
    model(inputs)
    collector.end_batch()
    (stats,) = collector.read()
    collector.detach()
    histogram = stats.histogram
    outputs = inputs.relu().flatten()
    assert histogram.count == outputs.numel()
    assert sum(histogram.counts) == outputs.numel()
    assert histogram.total == pytest.approx(outputs.sum().item())
    assert histogram.limits[0] == 0.0
    assert histogram.counts[0] == (outputs == 0).sum().item()
    lower = [-math.inf, *histogram.limits[:-1]]
    expected = [
        ((outputs > low) & (outputs <= high)).sum().item() for low, high in zip(lower, histogram.limits, strict=True)
    ]
    assert histogram.counts == expected
    assert set(histogram.limits) <= set(_stats.histogram_limits(spec_for(nn.ReLU())))


def test_hooks_are_in_place_only_during_measured_batches():
    model = ReusesOneActivation()
    collector = ActivationCollector()
    collector.attach(find_activation_layers(model))
    hooks = lambda: (len(model.act._forward_pre_hooks), len(model.act._forward_hooks))  # noqa: E731
    assert hooks() == (0, 0)
    collector.start_batch(measure=False)
    assert hooks() == (0, 0)
    collector.end_batch()
    collector.start_batch()
    assert hooks() == (1, 1)
    collector.start_batch()  # a repeated start does not hook twice
    assert hooks() == (1, 1)
    collector.end_batch()
    assert hooks() == (0, 0)
    collector.detach()


def test_detach_removes_every_hook_and_the_model_pickles():
    model = ReusesOneActivation()
    collector = ActivationCollector()
    collector.attach(find_activation_layers(model))
    collector.start_batch()
    assert model.act._forward_hooks
    assert model.act._forward_pre_hooks
    collector.detach()
    collector.detach()
    assert not model.act._forward_hooks
    assert not model.act._forward_pre_hooks
    pickle.loads(pickle.dumps(model))


def test_a_failing_measurement_warns_once_and_training_goes_on(monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(_stats, "output_totals", broken)
    model = nn.Sequential(nn.ReLU())
    collector = ActivationCollector()
    collector.attach(find_activation_layers(model))
    collector.start_batch()
    with pytest.warns(ActGuardWarning, match=r"Measuring activation layer '0' failed .*RuntimeError: boom"):
        out = model(torch.ones(2, 2))
    assert out.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collector.start_batch()
        model(torch.ones(2, 2))
    collector.detach()


def test_replace_moves_the_hooks_and_keeps_the_layer_name_with_the_new_spec():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid())
    collector = ActivationCollector()
    collector.attach(find_activation_layers(model))
    old, new = model[1], nn.ReLU()
    model[1] = new
    collector.start_batch()  # hooks in place, then moved
    collector.replace(old, new)
    assert (len(old._forward_hooks), len(old._forward_pre_hooks)) == (0, 0)
    assert (len(new._forward_hooks), len(new._forward_pre_hooks)) == (1, 1)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([1.0, -1.0, -1.0, 2.0]))
    model(torch.randn(5, 3))
    collector.end_batch()
    (layer,) = collector.read()
    assert (layer.name, layer.kind, layer.dead_frac, layer.saturated_frac) == ("1", "relu", 0.5, None)
    collector.detach()
    assert len(new._forward_hooks) == 0
