import math

import pytest
import torch
from torch import nn

from lightning_actguard import ActGuardWarning
from lightning_actguard.gradients import GradientCollector, GradientThresholds


def two_layer_model():
    """y = second(first(x)) with known weights, so every gradient can be computed by hand."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 0.0]))
        model[1].weight.copy_(torch.tensor([[3.0, 4.0]]))
        model[1].bias.copy_(torch.tensor([0.5]))
    return model


def step(model, optimizer, collector, inputs, **kwargs):
    optimizer.zero_grad()
    model(inputs).sum().backward()
    collector.before_step(optimizer, **kwargs)
    optimizer.step()


def test_norms_match_a_hand_computation():
    # x = (1, 1): h = (1, 2), y = 3 + 8 + 0.5. dy/dW2 = h = (1, 2), dy/db2 = 1 -> |g2| = sqrt(6).
    # dy/dh = W2 = (3, 4): dy/dW1 = outer((3, 4), x) = [[3, 3], [4, 4]], dy/db1 = (3, 4) -> |g1| = sqrt(75).
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    collector = GradientCollector(model)
    collector.attach([optimizer])
    step(model, optimizer, collector, torch.ones(1, 2))
    stats = collector.read()
    assert stats.layers["0"].norm == pytest.approx(math.sqrt(75))
    assert stats.layers["1"].norm == pytest.approx(math.sqrt(6))
    assert stats.total_norm == pytest.approx(math.sqrt(81))
    assert stats.depth_ratio == pytest.approx(math.sqrt(75 / 6))
    assert (stats.steps, stats.vanishing, stats.exploding, stats.diagnosis) == (1, False, False, "")


def test_window_norm_is_the_root_mean_square_over_steps():
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    collector = GradientCollector(model)
    step(model, optimizer, collector, torch.ones(1, 2))  # |g2|^2 = 6
    step(model, optimizer, collector, 2 * torch.ones(1, 2))  # h = (2, 4): |g2|^2 = 4 + 16 + 1 = 21
    assert collector.read().layers["1"].norm == pytest.approx(math.sqrt((6 + 21) / 2))


def test_update_ratio_is_the_actual_change_of_the_weights():
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    collector = GradientCollector(model)
    collector.attach([optimizer])
    before = torch.cat([p.detach().flatten() for p in model[1].parameters()])
    step(model, optimizer, collector, torch.ones(1, 2))
    after = torch.cat([p.detach().flatten() for p in model[1].parameters()])
    stats = collector.read()
    # SGD moves the weights by lr * g: |0.1 * (1, 2, 1)| / |(3, 4, 0.5)|.
    assert stats.layers["1"].update_ratio == pytest.approx(((after - before).norm() / before.norm()).item())
    assert stats.layers["1"].update_ratio == pytest.approx(0.1 * math.sqrt(6) / math.sqrt(25.25))
    collector.detach()


@pytest.mark.parametrize("channels_last", [False, True])
def test_update_ratio_of_a_large_layer_is_measured_on_a_sample_close_to_the_whole(channels_last):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(64 * 16, 10))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    collector = GradientCollector(model)
    collector.attach([optimizer])
    before = [p.detach().clone() for p in model[0].parameters()]
    loss = model(torch.randn(8, 64, 6, 6)).square().mean()
    loss.backward()
    collector.before_step(optimizer)
    copied = sum(sample.numel() for sample in collector._before_update[id(optimizer)][1])
    optimizer.step()
    exact = math.sqrt(
        sum((p.detach() - b).square().sum().item() for p, b in zip(model[0].parameters(), before, strict=True))
        / sum(b.square().sum().item() for b in before)
    )
    # Every 9th of the convolution's 36,864 weights (all of them when channels-last weights
    # cannot be viewed flat), every 2nd of the linear layer's 10,240, every bias.
    assert copied == (36_864 if channels_last else 4_096) + 64 + 5_120 + 10
    assert collector.read().layers["0"].update_ratio == pytest.approx(exact, rel=0.05)
    collector.detach()


def test_update_ratio_is_measured_on_the_first_step_of_each_window_only():
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    collector = GradientCollector(model)
    collector.attach([optimizer])
    step(model, optimizer, collector, torch.ones(1, 2))
    assert collector._before_update == {}  # the copy is gone once the step is measured
    step(model, optimizer, collector, torch.ones(1, 2))
    assert collector._before_update == {}
    weight_squares = collector.pack()[3].view(2, 2)[1]  # |W_before|^2 per layer, summed over measured steps
    assert weight_squares[1].item() == pytest.approx(25.25)  # once: 3^2 + 4^2 + 0.5^2
    collector.reset()
    step(model, optimizer, collector, torch.ones(1, 2))  # a new window measures again
    assert collector.read().layers["1"].update_ratio is not None
    collector.detach()
    assert not optimizer._optimizer_step_post_hooks


def test_a_nan_gradient_is_counted_and_raises_the_exploding_flag():
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    collector = GradientCollector(model)
    optimizer.zero_grad()
    model(torch.ones(1, 2)).sum().backward()
    model[0].bias.grad[1] = math.nan
    collector.before_step(optimizer)
    step(model, optimizer, collector, torch.ones(1, 2))
    stats = collector.read()
    assert (stats.layers["0"].nonfinite_steps, stats.layers["1"].nonfinite_steps) == (1, 0)
    assert (stats.nonfinite_steps, stats.steps, stats.exploding) == (1, 1, True)
    assert stats.layers["0"].norm == pytest.approx(math.sqrt(75))  # the finite step only
    assert "1 optimizer steps got NaN or infinite gradients" in stats.diagnosis


def test_steps_a_gradient_scaler_skips_are_counted_apart():
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    collector = GradientCollector(model)
    optimizer.zero_grad()
    model(torch.ones(1, 2)).sum().backward()
    model[1].weight.grad[0, 0] = math.inf
    collector.before_step(optimizer, scaler=True)
    stats = collector.read()
    assert (stats.skipped_steps, stats.nonfinite_steps, stats.steps) == (1, 0, 0)
    assert stats.exploding  # every step of the window was skipped
    assert "skipped all 1 steps" in stats.diagnosis


def test_gradients_still_carrying_the_loss_scale_are_divided_by_it():
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    collector = GradientCollector(model)
    optimizer.zero_grad()
    (65536.0 * model(torch.ones(1, 2)).sum()).backward()
    collector.before_step(optimizer, grad_scale=torch.tensor(65536.0))
    assert collector.read().layers["1"].norm == pytest.approx(math.sqrt(6))


def test_vanishing_flag_from_the_depth_ratio_and_the_floor():
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    strict = GradientCollector(model, thresholds=GradientThresholds(vanishing_ratio=0.999, vanishing_floor=1e-8))
    optimizer.zero_grad()
    (1e-12 * model(torch.ones(1, 2)).sum()).backward()
    strict.before_step(optimizer)
    stats = strict.read()
    assert stats.vanishing
    assert stats.depth_ratio > 0.999  # not the ratio: both weight layers are below the floor
    assert "2 of 2 weight layers have gradient norms below 1e-08" in stats.diagnosis


def test_shared_window_reduction_divides_replicated_sums_and_keeps_sharded_ones():
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    replicated, sharded = GradientCollector(model), GradientCollector(model, sharded=True)
    step(model, optimizer, replicated, torch.ones(1, 2))
    step(model, optimizer, sharded, torch.ones(1, 2))

    def two_identical_ranks(flat):
        return flat * 2

    assert replicated.read(two_identical_ranks, world_size=2).layers["1"].norm == pytest.approx(math.sqrt(6))
    # Two shards each holding the whole layer's squares: the reduced norm is that of both together.
    assert sharded.read(two_identical_ranks, world_size=2).layers["1"].norm == pytest.approx(math.sqrt(12))


def test_layers_are_modules_owning_trainable_parameters_in_registration_order():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.LayerNorm(2), nn.Linear(2, 1))
    model[2].requires_grad_(False)
    assert GradientCollector(model).layer_names == ["0", "3"]


def test_a_failing_measurement_warns_and_training_goes_on(monkeypatch):
    model = two_layer_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    collector = GradientCollector(model)

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "_foreach_norm", broken)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.warns(ActGuardWarning, match="Measuring gradients failed .*RuntimeError: boom"):
        collector.before_step(optimizer)


def test_an_optimizer_over_foreign_parameters_gets_one_warning():
    model = two_layer_model()
    stranger = nn.Parameter(torch.ones(2))
    stranger.grad = torch.ones(2)
    collector = GradientCollector(model)
    with pytest.warns(ActGuardWarning, match="None of the parameters this optimizer updates belongs to a module"):
        collector.before_step(torch.optim.SGD([stranger], lr=0.1))
    assert collector.read() is None
