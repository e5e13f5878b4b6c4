import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F  # noqa: N812 - the spelling users write in forward

from lightning_actguard import ActGuardWarning
from lightning_actguard.activations import KNOWN_KINDS, find_activation_layers, spec_for
from lightning_actguard.functional import (
    _FUNCTIONS,
    _MODULE_FOR_KIND,
    FunctionalActivation,
    FunctionalActivationProbe,
    find_functional_activations,
    rewrite_functional_activations,
)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.relu(self.linear(x))
        x = torch.sigmoid(x)
        x = self.act(x)  # a module: its own F.relu is visible to hooks
        return F.relu(x - 0.5)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = Block()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return F.leaky_relu(self.proj(self.block1(x)), 0.2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.encoder(x).tanh())


class HandWritten(nn.Module):
    """Net with every activation a module, built around Net's own linear layers."""

    def __init__(self, net, sigmoid=None):
        super().__init__()
        block = net.encoder.block1
        self.linear, self.proj, self.head = block.linear, net.encoder.proj, net.head
        self.relu_a, self.sigmoid, self.act, self.relu_b = nn.ReLU(), sigmoid or nn.Sigmoid(), nn.ReLU(), nn.ReLU()
        self.leaky, self.tanh = nn.LeakyReLU(0.2), nn.Tanh()

    def forward(self, x):
        x = self.act(self.sigmoid(self.relu_a(self.linear(x))))
        x = self.relu_b(x - 0.5)
        return self.head(self.tanh(self.leaky(self.proj(x))))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return F.relu(self.linear(x))
        return torch.sigmoid(self.linear(x))


class Apply(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Apply(self.fail)

    @staticmethod
    def fail(x):
        F.relu(x)
        raise ValueError("broken forward")

    def forward(self, x):
        return self.inner(torch.sigmoid(x))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def mode_stack():
    return torch.overrides._get_current_function_mode_stack()


def assert_no_hooks(model):
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert not module._forward_hooks_always_called, name


def test_detection_reports_functional_calls_under_the_calling_module(net):
    found = find_functional_activations(net, torch.randn(3, 4))

    # Block.forward calls F.relu twice and torch.sigmoid once; its nn.ReLU's own F.relu is not counted.
    assert found == [
        FunctionalActivation("encoder.block1", "F.relu", "relu", 2),
        FunctionalActivation("encoder.block1", "torch.sigmoid", "sigmoid", 1),
        FunctionalActivation("encoder", "F.leaky_relu", "leakyrelu", 1),
        FunctionalActivation("", "Tensor.tanh", "tanh", 1),
    ]


def test_describe_names_the_module_or_the_root(net):
    found = find_functional_activations(net, torch.randn(3, 4))

    assert found[0].describe() == (
        "'encoder.block1' applies relu functionally (F.relu, 2 calls): not monitored and not swappable; "
        "rewrite it with rewrite_functional_activations() or use nn.ReLU"
    )
    assert found[-1].describe().startswith("(root) applies tanh functionally (Tensor.tanh, 1 call): ")
    assert found[-1].describe().endswith("use nn.Tanh")


@pytest.mark.parametrize(
    ("function", "name", "kind"),
    [
        pytest.param(lambda x: F.sigmoid(x), "Tensor.sigmoid", "sigmoid", id="F.sigmoid"),
        pytest.param(lambda x: torch.special.expit(x), "torch.special.expit", "sigmoid", id="torch.special.expit"),
        pytest.param(lambda x: x.clone().sigmoid_(), "Tensor.sigmoid_", "sigmoid", id="x.sigmoid_"),
        pytest.param(lambda x: F.relu_(x.clone()), "torch.relu_", "relu", id="F.relu_"),
        pytest.param(lambda x: x.clone().relu_(), "Tensor.relu_", "relu", id="x.relu_"),
        pytest.param(lambda x: torch.tanh(x), "torch.tanh", "tanh", id="torch.tanh"),
        pytest.param(lambda x: F.gelu(x, approximate="tanh"), "F.gelu", "gelu", id="F.gelu"),
        pytest.param(lambda x: F.silu(x), "F.silu", "silu", id="F.silu"),
        pytest.param(lambda x: F.elu(x), "F.elu", "elu", id="F.elu"),
        pytest.param(lambda x: F.selu(x), "F.selu", "selu", id="F.selu"),
        pytest.param(lambda x: F.softplus(x), "F.softplus", "softplus", id="F.softplus"),
        pytest.param(lambda x: F.hardtanh(x), "F.hardtanh", "hardtanh", id="F.hardtanh"),
        pytest.param(lambda x: F.relu6(x), "F.relu6", "relu6", id="F.relu6"),
        pytest.param(lambda x: F.mish(x), "F.mish", "mish", id="F.mish"),
        pytest.param(lambda x: F.hardswish(x), "F.hardswish", "hardswish", id="F.hardswish"),
        pytest.param(lambda x: F.hardsigmoid(x), "F.hardsigmoid", "hardsigmoid", id="F.hardsigmoid"),
        pytest.param(lambda x: F.logsigmoid(x), "F.logsigmoid", "logsigmoid", id="F.logsigmoid"),
        pytest.param(lambda x: F.softsign(x), "F.softsign", "softsign", id="F.softsign"),
    ],
)
def test_each_form_of_call_is_found_once(function, name, kind):
    found = find_functional_activations(Apply(function), torch.randn(2, 3))

    assert [(entry.function, entry.kind, entry.calls) for entry in found] == [(name, kind, 1)]


def test_every_kind_is_a_monitor_kind_with_a_matching_module():
    assert {function.kind for function in _FUNCTIONS.values()} == set(_MODULE_FOR_KIND)
    for kind, module_class in _MODULE_FOR_KIND.items():
        assert kind in KNOWN_KINDS
        assert spec_for(module_class()).kind == kind


def test_calls_inside_declared_custom_activations_are_not_reported():
    class GELUActivation(nn.Module):
        def forward(self, x):
            return F.gelu(x)

    model = nn.Sequential(nn.Linear(3, 3), GELUActivation())
    with FunctionalActivationProbe(model) as probe:
        model(torch.randn(2, 3))
    assert probe.results() == [FunctionalActivation("1", "F.gelu", "gelu", 1)]

    with FunctionalActivationProbe(model, extra_types=[GELUActivation]) as probe:
        model(torch.randn(2, 3))
    assert probe.results() == []


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_detection_leaves_mode_buffers_hooks_and_function_modes_as_they_were(training):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), Apply(F.relu)).train(training)
    running_mean = model[1].running_mean.clone()

    assert find_functional_activations(model, torch.randn(8, 4) + 3.0)

    assert all(module.training is training for module in model.modules())
    torch.testing.assert_close(model[1].running_mean, running_mean, rtol=0, atol=0)
    assert model[1].num_batches_tracked.item() == 0
    assert_no_hooks(model)
    assert mode_stack() == []


def test_detection_cleans_up_when_forward_raises():
    model = Failing()

    with pytest.raises(ValueError, match="broken forward"):
        find_functional_activations(model, torch.randn(2, 3))

    assert_no_hooks(model)
    assert mode_stack() == []


def test_probe_hooks_unwind_a_failed_forward_and_keep_counting():
    model = Failing()
    probe = FunctionalActivationProbe(model)
    probe.start()
    try:
        with pytest.raises(ValueError, match="broken forward"):
            model(torch.randn(2, 3))
        assert mode_stack() == []  # left by the forward hooks, before stop()
        model.inner.function = torch.tanh
        model(torch.randn(2, 3))
    finally:
        found = probe.stop()

    assert found == [
        FunctionalActivation("", "torch.sigmoid", "sigmoid", 2),
        FunctionalActivation("inner", "F.relu", "relu", 1),
        FunctionalActivation("inner", "torch.tanh", "tanh", 1),
    ]


def test_probe_ignores_code_between_forwards(net):
    probe = FunctionalActivationProbe(net)
    probe.start()
    try:
        output = net(torch.randn(2, 4))
        assert mode_stack() == []
        torch.sigmoid(output).sum()  # like a loss computed outside the model
        net(torch.randn(2, 4))
    finally:
        found = probe.stop()

    assert [(entry.module, entry.function, entry.calls) for entry in found] == [
        ("encoder.block1", "F.relu", 4),
        ("encoder.block1", "torch.sigmoid", 2),
        ("encoder", "F.leaky_relu", 2),
        ("", "Tensor.tanh", 2),
    ]


def test_probe_start_twice_raises_and_stop_is_idempotent(net):
    probe = FunctionalActivationProbe(net)
    probe.start()
    with pytest.raises(RuntimeError, match=r"start\(\) called twice"):
        probe.start()
    net(torch.randn(2, 4))

    first, second = probe.stop(), probe.stop()

    assert first == second
    assert len(first) == 4
    assert not probe.started
    assert_no_hooks(net)


def test_stop_in_the_middle_of_a_forward_leaves_the_mode():
    model = Apply(torch.tanh)
    probe = FunctionalActivationProbe(model)
    model.function = lambda x: (probe.stop(), torch.sigmoid(x))[1]
    probe.start()

    model(torch.randn(2))

    assert mode_stack() == []
    assert probe.results() == []  # the sigmoid came after stop()
    assert_no_hooks(model)


def test_detection_rejects_something_that_is_not_a_module():
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module, got function"):
        find_functional_activations(F.relu, torch.randn(2))


def test_detection_follows_the_branch_a_model_fx_cannot_trace_takes():
    model = Branchy()

    assert find_functional_activations(model, torch.ones(1, 4)) == [FunctionalActivation("", "F.relu", "relu", 1)]
    assert find_functional_activations(model, -torch.ones(1, 4)) == [
        FunctionalActivation("", "torch.sigmoid", "sigmoid", 1)
    ]


def test_rewrite_matches_the_original_and_a_hand_written_model(net):
    x = torch.randn(5, 4)
    rewritten, rewrites = rewrite_functional_activations(net)

    torch.testing.assert_close(rewritten(x), net(x))
    torch.testing.assert_close(rewritten(x), HandWritten(net)(x))
    assert [(r.module, r.function, r.new_name, type(r.new_module)) for r in rewrites] == [
        ("encoder.block1", "F.relu", "encoder_block1_relu", nn.ReLU),
        ("encoder.block1", "torch.sigmoid", "encoder_block1_sigmoid", nn.Sigmoid),
        ("encoder.block1", "F.relu", "encoder_block1_relu_1", nn.ReLU),
        ("encoder", "F.leaky_relu", "encoder_leakyrelu", nn.LeakyReLU),
        ("", "Tensor.tanh", "tanh", nn.Tanh),
    ]
    assert rewritten.encoder_leakyrelu.negative_slope == 0.2
    assert rewrites[3].describe() == "'encoder': F.leaky_relu -> encoder_leakyrelu = LeakyReLU(negative_slope=0.2)"


def test_rewritten_model_has_no_functional_activations_left(net):
    rewritten, rewrites = rewrite_functional_activations(net)

    assert find_functional_activations(rewritten, torch.randn(2, 4)) == []
    layers = {layer.name for layer in find_activation_layers(rewritten)}
    assert {rewrite.new_name for rewrite in rewrites} <= layers
    assert len(find_functional_activations(net, torch.randn(2, 4))) == 4  # the original is untouched


def test_rewrite_shares_parameters_and_keeps_eval_mode(net):
    net.eval()
    rewritten, rewrites = rewrite_functional_activations(net)

    assert {id(p) for p in rewritten.parameters()} == {id(p) for p in net.parameters()}
    assert not rewritten.training
    assert not any(rewrite.new_module.training for rewrite in rewrites)


class Options(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 6)

    def forward(self, x):
        x = self.linear(x)
        a = F.gelu(x, approximate="tanh")
        b = F.softplus(x, beta=2.0, threshold=0.5)
        c = F.elu(x, 0.5)
        d = F.relu(x * 3.0, inplace=True)
        e = x - 1.0
        e.relu_()  # result unused: only the in-place change carries it on
        f = F.hardtanh_(x * 4.0, -2.0, 2.0)
        return torch.cat((a, b, c, d, e, f), dim=1)


def test_rewrite_carries_over_arguments_and_in_place_forms():
    torch.manual_seed(0)
    model = Options()
    x = torch.randn(5, 4)
    rewritten, rewrites = rewrite_functional_activations(model)

    torch.testing.assert_close(rewritten(x), model(x))
    modules = {rewrite.function: rewrite.new_module for rewrite in rewrites}
    assert modules["F.gelu"].approximate == "tanh"
    assert (modules["F.softplus"].beta, modules["F.softplus"].threshold) == (2.0, 0.5)
    assert modules["F.elu"].alpha == 0.5
    assert modules["F.relu"].inplace
    assert modules["Tensor.relu_"].inplace
    hardtanh = modules["F.hardtanh_"]
    assert (hardtanh.min_val, hardtanh.max_val, hardtanh.inplace) == (-2.0, 2.0, True)


def test_rewrite_with_mapping_matches_a_hand_swapped_model(net):
    x = torch.randn(5, 4)
    rewritten, rewrites = rewrite_functional_activations(net, mapping={"sigmoid": nn.ReLU})

    torch.testing.assert_close(rewritten(x), HandWritten(net, sigmoid=nn.ReLU())(x))
    assert not torch.allclose(rewritten(x), net(x))
    swapped = [rewrite for rewrite in rewrites if rewrite.kind == "sigmoid"]
    assert [(r.new_name, type(r.new_module)) for r in swapped] == [("encoder_block1_relu_1", nn.ReLU)]


def test_mapping_instances_are_copied_and_take_the_in_place_flag():
    model = Apply(lambda x: F.relu(x * 1.0, inplace=True) + F.relu(x * 2.0, inplace=True))
    rewritten, rewrites = rewrite_functional_activations(model, mapping={"relu": nn.LeakyReLU(0.5)})

    first, second = (rewrite.new_module for rewrite in rewrites)
    assert first is not second
    assert (first.negative_slope, first.inplace) == (0.5, True)
    x = torch.tensor([[-2.0, 1.0]])
    torch.testing.assert_close(rewritten(x), torch.tensor([[-3.0, 3.0]]))  # 0.5*(-2) + 0.5*(-4), 1 + 2


def test_rewrite_avoids_names_the_graph_module_already_has():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.Linear(3, 3)  # an unlucky name for a linear layer

        def forward(self, x):
            return F.relu(self.relu(x))

    rewritten, rewrites = rewrite_functional_activations(Clash())

    assert rewrites[0].new_name == "relu_1"
    assert isinstance(rewritten.relu, nn.Linear)


@pytest.mark.parametrize(
    ("mapping", "error", "match"),
    [
        ({"leaky_relu": nn.ReLU}, ValueError, r"`mapping` keys must be one of \[.*'leakyrelu'.*\], got 'leaky_relu'"),
        ({"relu": 3}, TypeError, r"`mapping\['relu'\]` must be an nn.Module subclass.*got 3"),
        ({"relu": lambda: "relu"}, TypeError, r"`mapping\['relu'\]` returned 'relu', not an nn.Module"),
        ([("relu", nn.ReLU)], TypeError, r"`mapping` must map activation kinds to replacements, got list"),
    ],
    ids=["unknown-kind", "not-callable", "factory-returns-str", "not-a-mapping"],
)
def test_rewrite_rejects_bad_mappings(net, mapping, error, match):
    with pytest.raises(error, match=match):
        rewrite_functional_activations(net, mapping=mapping)


def test_untraceable_model_raises_a_clear_error():
    with pytest.raises(RuntimeError, match=r"torch\.fx could not trace Branchy") as caught:
        rewrite_functional_activations(Branchy())

    message = str(caught.value)
    assert "control flow" in message
    assert "by hand" in message
    assert isinstance(caught.value.__cause__, fx.proxy.TraceError)


class Unfaithful(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.25]))

    def forward(self, x):
        a = F.prelu(x, self.weight)
        b = F.glu(x, x.dim() - 1)
        y = x * 1.0
        c = y.sigmoid_()
        return a.sum() + b.sum() + y.sum() + c.sum()


def test_calls_no_module_can_replace_faithfully_are_left_with_a_warning():
    model = Unfaithful()
    x = torch.randn(2, 4)
    with pytest.warns(ActGuardWarning) as caught:
        rewritten, rewrites = rewrite_functional_activations(model)

    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 3
    assert "left F.prelu in (root)" in messages[0]
    assert "mapping={'prelu': ...}" in messages[0]
    assert "argument dim is computed in forward" in messages[1]
    assert "works in place on a tensor that forward reads again" in messages[2]
    assert rewrites == []
    torch.testing.assert_close(rewritten(x), model(x))
    assert {entry.function for entry in find_functional_activations(rewritten, x)} == {
        "F.prelu",
        "F.glu",
        "Tensor.sigmoid_",
    }
