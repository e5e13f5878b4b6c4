import inspect

import pytest
import torch
import torch.nn.modules.activation as torch_activations
from torch import nn

from lightning_actguard.activations import (
    KNOWN_KINDS,
    TORCH_ACTIVATIONS,
    find_activation_layers,
    spec_for,
)

NOT_ELEMENTWISE = {nn.Softmax, nn.Softmin, nn.Softmax2d, nn.LogSoftmax, nn.MultiheadAttention}


def test_every_torch_activation_is_known_or_deliberately_left_out():
    torch_classes = {
        cls
        for cls in vars(torch_activations).values()
        if inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == torch_activations.__name__
    }
    assert torch_classes - NOT_ELEMENTWISE == set(TORCH_ACTIVATIONS)


@pytest.mark.parametrize(
    ("module", "floor", "hard_floor", "bounds"),
    [
        (nn.ReLU(), 0.0, True, None),
        (nn.ReLU6(), 0.0, True, (0.0, 6.0)),
        (nn.Sigmoid(), 0.0, True, (0.0, 1.0)),
        (nn.Tanh(), -1.0, False, (-1.0, 1.0)),
        (nn.Hardtanh(-2.0, 3.0), -2.0, True, (-2.0, 3.0)),
        (nn.ELU(alpha=0.5), -0.5, True, None),
        (nn.Threshold(0.1, -7.0), -7.0, True, None),
        (nn.LeakyReLU(), 0.0, False, None),
        (nn.GELU(), 0.0, False, None),
    ],
    ids=["relu", "relu6", "sigmoid", "tanh", "hardtanh", "elu", "threshold", "leaky", "gelu"],
)
def test_specs_follow_the_module_arguments(module, floor, hard_floor, bounds):
    spec = spec_for(module)
    assert (spec.floor, spec.hard_floor, spec.bounds) == (floor, hard_floor, bounds)


def test_selu_floor_is_its_lowest_output():
    assert spec_for(nn.SELU()).floor == pytest.approx(nn.SELU()(torch.tensor([-100.0])).item())


class GELUActivation(nn.Module):
    """Stands for Hugging Face's class of the same name."""

    def forward(self, x):
        return nn.functional.gelu(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.act = GELUActivation()
        self.gate = nn.Identity()

    def forward(self, x):
        return self.gate(self.act(self.proj(x)))


def test_finds_torch_activations_under_qualified_names():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    assert [(layer.name, layer.spec.kind) for layer in find_activation_layers(model)] == [
        ("1", "relu"),
        ("2.1", "tanh"),
    ]


def test_custom_classes_by_type_with_a_kind():
    model = nn.Sequential(Block(), Block())
    layers = find_activation_layers(model, extra_types={GELUActivation: "gelu"})
    assert [layer.name for layer in layers] == ["0.act", "1.act"]
    assert layers[0].spec == KNOWN_KINDS["gelu"]


def test_custom_classes_by_name_pattern_and_predicate():
    model = nn.Sequential(Block())
    by_pattern = find_activation_layers(model, name_pattern=r"\.gate$")
    by_predicate = find_activation_layers(model, predicate=lambda name, module: isinstance(module, GELUActivation))
    assert [layer.name for layer in by_pattern] == ["0.gate"]
    assert [layer.name for layer in by_predicate] == ["0.act"]
    assert by_predicate[0].spec.kind == "geluactivation"


def test_a_module_registered_twice_is_listed_once():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(2, 2), relu, nn.Linear(2, 2), relu)
    assert [layer.name for layer in find_activation_layers(model)] == ["1"]


@pytest.mark.parametrize(
    ("extra_types", "match"),
    [
        ([nn.Linear, "relu"], "must hold nn.Module subclasses, got 'relu'"),
        ({GELUActivation: "gelu2"}, "maps GELUActivation to 'gelu2'; allowed names are"),
    ],
    ids=["not-a-class", "unknown-kind"],
)
def test_bad_extra_types_are_refused(extra_types, match):
    with pytest.raises(ValueError, match=match):
        find_activation_layers(nn.Sequential(), extra_types=extra_types)
