import pytest
import torch
from torch import nn

from lightning_actguard.param_groups import adopt_parameters, release_parameters
from lightning_actguard.swap import init_for_activation, reapply_swaps, swap_activations, swap_records


class Block(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.act = act

    def forward(self, x):
        return self.act(self.linear(x))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(nn.Sigmoid()), Block(nn.ReLU(inplace=True))])
        self.heads = nn.ModuleDict({"left": nn.Tanh(), "right": nn.Sequential(nn.Linear(3, 3), nn.Sigmoid())})

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.heads["left"](x) + self.heads["right"](x)


def test_sequential_swap_reports_names_and_changes_outputs_as_the_hand_swapped_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.ReLU())
    reference = nn.Sequential(model[0], nn.SELU(), model[2], nn.LeakyReLU(0.1))
    report = swap_activations(model, {nn.Sigmoid: nn.SELU, nn.ReLU: lambda old: nn.LeakyReLU(0.1)})
    assert [(swap.name, type(swap.old), type(swap.new)) for swap in report.swaps] == [
        ("1", nn.Sigmoid, nn.SELU),
        ("3", nn.ReLU, nn.LeakyReLU),
    ]
    assert isinstance(model[1], nn.SELU)
    assert model[3].negative_slope == 0.1
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), reference(x))


def test_nested_modules_module_list_and_module_dict():
    model = Nested()
    report = swap_activations(model, {nn.Sigmoid: nn.ELU, nn.Tanh: nn.SELU})
    assert sorted(swap.name for swap in report.swaps) == ["blocks.0.act", "heads.left", "heads.right.1"]
    assert isinstance(model.blocks[0].act, nn.ELU)
    assert isinstance(model.heads["left"], nn.SELU)
    assert isinstance(model.heads["right"][1], nn.ELU)
    assert isinstance(model.blocks[1].act, nn.ReLU)
    assert model(torch.randn(2, 3)).shape == (2, 3)


def test_inplace_is_carried_over_and_mode_is_kept():
    model = Nested().eval()
    swap_activations(model, {nn.ReLU: nn.LeakyReLU, nn.Sigmoid: nn.Hardswish})
    assert model.blocks[1].act.inplace is True
    assert model.blocks[0].act.inplace is False  # Sigmoid has no inplace flag to carry
    assert not any(module.training for module in model.modules())


def test_reused_module_is_replaced_once_and_stays_shared():
    shared = nn.ReLU()
    model = nn.Sequential(nn.Linear(2, 2), shared, nn.Linear(2, 2), shared)
    report = swap_activations(model, {nn.ReLU: nn.PReLU})
    assert len(report) == 1
    assert report.swaps[0].names == ("1", "3")
    assert model[1] is model[3]
    assert isinstance(model[1], nn.PReLU)


def test_instance_replacement_is_copied_per_module():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU())
    swap_activations(model, {nn.ReLU: nn.PReLU()})
    assert model[1] is not model[3]
    assert model[1].weight is not model[3].weight


def test_name_patterns_include_and_exclude():
    model = Nested()
    report = swap_activations(model, {"heads": nn.GELU})
    # A pattern selects activations only: not the ModuleDict, the Sequential or the Linear in it.
    assert sorted(swap.name for swap in report.swaps) == ["heads.left", "heads.right.1"]
    model = Nested()
    report = swap_activations(model, {nn.Sigmoid: nn.ReLU}, include=["heads.right.1"])
    assert [swap.name for swap in report.swaps] == ["heads.right.1"]
    model = Nested()
    report = swap_activations(model, {nn.Sigmoid: nn.ReLU}, exclude=r"^blocks")
    assert [swap.name for swap in report.swaps] == ["heads.right.1"]


def test_subclass_match_and_most_specific_class_wins():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU6(), nn.Hardtanh())
    swap_activations(model, {nn.Hardtanh: nn.Tanh, nn.ReLU6: nn.ReLU})
    assert type(model[1]) is nn.ReLU
    assert type(model[2]) is nn.Tanh


def test_no_match_gives_an_empty_report_that_says_so():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    report = swap_activations(model, {nn.Sigmoid: nn.SELU})
    assert not report
    assert "replaced nothing" in str(report)
    assert "Sigmoid" in str(report)
    assert isinstance(model[1], nn.ReLU)


def test_device_and_dtype_follow_the_surrounding_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).to(torch.float64)
    swap_activations(model, {nn.ReLU: nn.PReLU})
    assert model[1].weight.dtype == torch.float64
    assert model[1].weight.device == model[0].weight.device


@pytest.mark.parametrize(
    ("mapping", "error", "match"),
    [
        ([(nn.ReLU, nn.ELU)], TypeError, "`mapping` must map"),
        ({}, ValueError, "`mapping` is empty"),
        ({nn.ReLU: nn.ReLU}, ValueError, "to itself"),
        ({nn.Sequential: nn.ReLU}, ValueError, "whole blocks"),
        ({nn.Module: nn.ReLU}, ValueError, "whole blocks"),
        ({3: nn.ReLU}, TypeError, "keys must be"),
        ({nn.ReLU: "elu"}, TypeError, r"mapping\[ReLU\]"),
        ({nn.ReLU: int}, TypeError, r"mapping\[ReLU\]"),
        ({"(": nn.ReLU}, ValueError, "not a valid regular expression"),
        ({nn.ReLU: lambda old: 3}, TypeError, "returned 3, not an nn.Module"),
    ],
)
def test_bad_mappings_are_refused(mapping, error, match):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(error, match=match):
        swap_activations(model, mapping)


def test_bad_name_filters_are_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match="`include`"):
        swap_activations(model, {nn.ReLU: nn.ELU}, include="[")
    with pytest.raises(TypeError, match="`exclude`"):
        swap_activations(model, {nn.ReLU: nn.ELU}, exclude=3)


def test_undo_restores_the_original_modules():
    model = Nested()
    before = dict(model.named_modules())
    report = swap_activations(model, {nn.Sigmoid: nn.ReLU, nn.Tanh: nn.ELU})
    report.undo(model)
    assert dict(model.named_modules()) == before


def test_records_reapply_into_a_fresh_model_and_load_its_weights():
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.Sigmoid())
    report = swap_activations(trained, {nn.ReLU: lambda old: nn.PReLU(init=0.3), nn.Sigmoid: nn.CELU(alpha=0.5)})
    records = swap_records(report.swaps)
    fresh = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.Sigmoid())
    redone = reapply_swaps(fresh, records)
    assert [swap.name for swap in redone.swaps] == ["1", "3"]
    fresh.load_state_dict(trained.state_dict())
    assert fresh[3].alpha == 0.5
    x = torch.randn(4, 3)
    torch.testing.assert_close(fresh(x), trained(x))
    assert not reapply_swaps(fresh, records)  # already applied: nothing to do


def test_reapply_refuses_a_model_that_does_not_fit_the_record():
    report = swap_activations(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), {nn.ReLU: nn.ELU})
    records = swap_records(report.swaps)
    with pytest.raises(ValueError, match=r"expects a torch\.nn\.modules\.activation\.ReLU"):
        reapply_swaps(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), records)
    with pytest.raises(ValueError, match="no module named '1'"):
        reapply_swaps(nn.Sequential(nn.Linear(2, 2)), records)


def test_new_parameters_join_the_group_of_their_neighbour_in_model_order():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    optimizer = torch.optim.Adam(
        [{"params": model[0].parameters()}, {"params": [*model[2].parameters(), *model[4].parameters()], "lr": 0.1}]
    )
    report = swap_activations(model, {nn.ReLU: nn.PReLU})
    placed = adopt_parameters(model, [optimizer], report.new_parameters())
    assert placed == ["1.weight -> optimizer 0 group 0", "3.weight -> optimizer 0 group 1"]
    # Each group now holds its parameters in model order, as a fresh optimizer built after the swap would.
    expected = [[*model[0].parameters(), model[1].weight], [*model[2].parameters(), *model[3:].parameters()]]
    for group, params in zip(optimizer.param_groups, expected, strict=True):
        assert [id(p) for p in group["params"]] == [id(p) for p in params]
    assert optimizer.param_groups[1]["lr"] == 0.1

    model(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    assert model[1].weight in optimizer.state
    release_parameters([optimizer], report.new_parameters())
    assert model[1].weight not in optimizer.state
    assert all(id(p) != id(model[1].weight) for g in optimizer.param_groups for p in g["params"])


def test_init_for_activation_draws_the_variance_each_activation_expects():
    torch.manual_seed(0)
    layer = nn.Linear(400, 300)
    assert init_for_activation(layer, nn.SELU()) == "lecun_normal"
    assert layer.weight.var().item() == pytest.approx(1 / 400, rel=0.02)
    assert torch.count_nonzero(layer.bias) == 0
    assert init_for_activation(layer, nn.ReLU()) == "kaiming_normal"
    assert layer.weight.var().item() == pytest.approx(2 / 400, rel=0.02)
    before = layer.weight.clone()
    assert init_for_activation(layer, nn.Sigmoid()) is None
    assert torch.equal(layer.weight, before)
    assert init_for_activation(nn.LayerNorm(4), nn.ReLU()) is None
