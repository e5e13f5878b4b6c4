"""revive_units, feeding_layer and Reviver on hand-built layers: only the dead units change, and they fire again."""

import math

import pytest
import torch
from torch import nn

from lightning_actguard.revive import Reviver, feeding_layer, revive_units

DEAD = [1, 4]


def with_dead_units(layer):
    """Units 1 and 4 of ``layer`` never fire after a ReLU: zero incoming weights, bias -100."""
    with torch.no_grad():
        layer.weight[DEAD] = 0.0
        layer.bias[DEAD] = -100.0
    return layer


def fired(layer, inputs):
    outputs = torch.relu(layer(inputs))
    dims = [dim for dim in range(outputs.dim()) if dim != 1]
    return outputs.amax(dim=dims) > 0


@pytest.mark.parametrize(
    ("layer", "inputs"),
    [(nn.Linear(8, 6), torch.randn(256, 8)), (nn.Conv2d(3, 6, kernel_size=3), torch.randn(32, 3, 5, 5))],
    ids=["linear", "conv2d"],
)
def test_only_the_dead_units_entries_change_and_the_units_fire_again(layer, inputs):
    torch.manual_seed(0)
    with_dead_units(layer)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    assert fired(layer, inputs).tolist() == [True, False, True, True, False, True]

    assert revive_units(layer, torch.tensor(DEAD), generator=torch.Generator().manual_seed(0)) == 2

    others = [unit for unit in range(6) if unit not in DEAD]
    assert torch.equal(layer.weight[others], weight[others])  # bit for bit
    assert torch.equal(layer.bias[others], bias[others])
    bound = 1 / math.sqrt(layer.weight[0].numel())  # the default init of Linear and ConvNd
    assert layer.weight[DEAD].abs().max() <= bound
    assert layer.bias[DEAD].abs().max() <= bound
    assert layer.weight[DEAD].std() > bound / 4  # drawn, not constant
    assert fired(layer, inputs).all()


def test_the_same_seed_draws_the_same_values_whatever_the_global_generator():
    first, second = with_dead_units(nn.Linear(8, 6)), with_dead_units(nn.Linear(8, 6))
    torch.manual_seed(1)
    revive_units(first, DEAD, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    revive_units(second, DEAD, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.weight[DEAD], second.weight[DEAD])
    assert torch.equal(first.bias[DEAD], second.bias[DEAD])


@pytest.mark.parametrize(
    ("make_optimizer", "keys"),
    [
        (lambda params: torch.optim.Adam(params, lr=0.01), ("exp_avg", "exp_avg_sq")),
        (lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9), ("momentum_buffer",)),
    ],
    ids=["adam", "sgd-momentum"],
)
def test_the_optimizer_state_of_the_revived_entries_is_zeroed_and_the_rest_kept(make_optimizer, keys):
    layer = nn.Linear(8, 6)
    optimizer = make_optimizer(layer.parameters())
    for _ in range(2):
        optimizer.zero_grad()
        layer(torch.randn(16, 8)).pow(2).sum().backward()
        optimizer.step()
    before = {(id(param), key): optimizer.state[param][key].clone() for param in layer.parameters() for key in keys}

    revive_units(layer, DEAD, [optimizer], torch.Generator().manual_seed(0))

    others = [unit for unit in range(6) if unit not in DEAD]
    for param in layer.parameters():
        for key in keys:
            state = optimizer.state[param][key]
            assert not state[DEAD].any()
            assert torch.equal(state[others], before[(id(param), key)][others])
            assert before[(id(param), key)][DEAD].any()  # there was something to zero


def test_feeding_layer_steps_over_normalisation_and_refuses_what_does_not_match():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(), nn.ReLU(), nn.Linear(8, 3), nn.ReLU())
    assert feeding_layer(model, "3", units=8)[0] == "0"
    assert feeding_layer(model, "5", units=3)[0] == "4"
    assert feeding_layer(model, "5", units=4) is None  # the nearest weight layer has 3 outputs

    class RegisteredBackwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()
            self.fc = nn.Linear(2, 2)

    assert feeding_layer(RegisteredBackwards(), "act", units=2) is None
    transposed = nn.Sequential(nn.ConvTranspose2d(2, 4, 3), nn.ReLU())
    assert feeding_layer(transposed, "1", units=4) is None


def test_reviver_revives_units_that_died_since_the_baseline_and_names_what_it_cannot_revive():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.ReLU())
    missing = []
    alive = {"1": torch.tensor([True, True, False]), "4": torch.tensor([True, True, True])}
    reviver = Reviver(model, alive, on_missing=lambda name, units: missing.append((name, units)))
    untouched = model[2].weight.detach().clone()

    dead_now = {"1": torch.tensor([True, False, True]), "4": torch.tensor([True, False, False])}
    revivals = reviver.revive(dead_now, [], seed=3)
    reviver.revive(dead_now, [], seed=4)

    assert [(revival.activation, revival.layer, revival.units) for revival in revivals] == [("1", "0", [0])]
    assert missing == [("4", 3)]  # a Tanh stands between "4" and the nearest Linear; reported once
    assert torch.equal(model[2].weight, untouched)


def test_named_layers_are_used_as_given_and_misuse_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.ReLU())
    reviver = Reviver(model, {"2": torch.tensor([True, True, True])}, layers={"2": "0"})
    assert reviver.revive({"2": torch.tensor([False, True, False])}, [], seed=0)[0].units == [1]

    with pytest.raises(TypeError, match="`layer` must be a Linear or a non-transposed convolution, got Tanh"):
        revive_units(nn.Tanh(), [0])
    with pytest.raises(IndexError, match=r"`units` must lie in \[0, 3\), got \[3\]"):
        revive_units(nn.Linear(2, 3), [3])
