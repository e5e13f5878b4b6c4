import math
import pickle
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as schedulers
from torch.optim.swa_utils import SWALR

from lightning_actguard.lr_scaling import LrChange, scale_learning_rates, unsupported_schedulers

LRS = (0.1, 0.03)  # two param groups with different rates
# Improves twice, then stays flat: with patience 1 ReduceLROnPlateau halves the rates every other step.
PLATEAU_METRICS = [1.0, 0.9, 0.9, 0.9, 0.8, 0.8] + [0.8] * 30


class Case(NamedTuple):
    build: Callable[[torch.optim.Optimizer], object]
    before: int  # scheduler steps before the reduction
    after: int  # scheduler steps after it, enough to cross the schedule's turning points
    lrs: tuple[float, ...] = LRS


def make_optimizer(lrs=LRS):
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)  # CyclicLR and OneCycleLR cycle the momentum


CASES = {
    "StepLR": Case(lambda opt: schedulers.StepLR(opt, step_size=3, gamma=0.5), before=4, after=10),
    "MultiStepLR": Case(lambda opt: schedulers.MultiStepLR(opt, milestones=[2, 5, 9, 9], gamma=0.3), 3, 10),
    "ExponentialLR": Case(lambda opt: schedulers.ExponentialLR(opt, gamma=0.8), 3, 8),
    # The trough is at step 5; the step after it takes the branch that adds a share of base_lr.
    "CosineAnnealingLR": Case(lambda opt: schedulers.CosineAnnealingLR(opt, T_max=5), 2, 20),
    "CosineAnnealingLR-eta_min-one-group": Case(
        lambda opt: schedulers.CosineAnnealingLR(opt, T_max=5, eta_min=0.01), 2, 20, lrs=(0.1,)
    ),
    "CosineAnnealingLR-eta_min-two-groups": Case(
        lambda opt: schedulers.CosineAnnealingLR(opt, T_max=5, eta_min=0.01), 2, 20
    ),
    # Restarts after steps 3, 9 and 21.
    "CosineAnnealingWarmRestarts": Case(
        lambda opt: schedulers.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2, eta_min=0.001), 2, 20
    ),
    # Peak at step 8 (pct_start 0.3 of 30 steps), the reduction during the warmup.
    "OneCycleLR": Case(lambda opt: schedulers.OneCycleLR(opt, max_lr=[1.0, 0.3], total_steps=30), 4, 25),
    "OneCycleLR-three-phase": Case(
        lambda opt: schedulers.OneCycleLR(opt, max_lr=[1.0, 0.3], total_steps=30, three_phase=True), 4, 25
    ),
    "LambdaLR": Case(lambda opt: schedulers.LambdaLR(opt, [lambda e: 0.9**e, lambda e: 1 / (1 + e)]), 3, 8),
    "MultiplicativeLR": Case(lambda opt: schedulers.MultiplicativeLR(opt, lambda e: 0.8 if e % 2 else 1.0), 3, 8),
    "LinearLR": Case(lambda opt: schedulers.LinearLR(opt, start_factor=0.25, total_iters=6), 2, 10),
    "ConstantLR": Case(lambda opt: schedulers.ConstantLR(opt, factor=0.5, total_iters=5), 2, 8),
    "PolynomialLR": Case(lambda opt: schedulers.PolynomialLR(opt, total_iters=8, power=2.0), 3, 10),
    "CyclicLR": Case(
        lambda opt: schedulers.CyclicLR(
            opt, base_lr=[0.01, 0.002], max_lr=[0.1, 0.03], step_size_up=3, step_size_down=2, mode="triangular2"
        ),
        2,
        20,
    ),
    # Switches at step 4 to the ExponentialLR, which then starts over from its base_lrs.
    "SequentialLR": Case(
        lambda opt: schedulers.SequentialLR(
            opt,
            [schedulers.LinearLR(opt, start_factor=0.1, total_iters=3), schedulers.ExponentialLR(opt, gamma=0.8)],
            milestones=[4],
        ),
        2,
        10,
    ),
    "SequentialLR-into-cosine": Case(
        lambda opt: schedulers.SequentialLR(
            opt,
            [
                schedulers.ConstantLR(opt, factor=0.2, total_iters=3),
                schedulers.CosineAnnealingLR(opt, T_max=4, eta_min=0.001),
            ],
            milestones=[3],
        ),
        1,
        14,
    ),
    "ChainedScheduler": Case(
        lambda opt: schedulers.ChainedScheduler(
            [schedulers.LinearLR(opt, start_factor=0.2, total_iters=4), schedulers.CosineAnnealingLR(opt, T_max=6)]
        ),
        2,
        16,
    ),
    # Reaches the floor of both groups (0.004 and 0.001) after the reduction.
    "ReduceLROnPlateau": Case(
        lambda opt: schedulers.ReduceLROnPlateau(opt, factor=0.5, patience=1, min_lr=[0.004, 0.001]), 5, 16
    ),
    # eps 0.03: the unreduced run halves 0.1 once (a change of 0.05) and then stops (0.025 < eps); the
    # reduced run must make the same first reduction, a change of only 0.025.
    "ReduceLROnPlateau-eps": Case(
        lambda opt: schedulers.ReduceLROnPlateau(opt, factor=0.5, patience=0, eps=0.03), 1, 8
    ),
    "SWALR": Case(lambda opt: SWALR(opt, swa_lr=[0.05, 0.01], anneal_epochs=5), 2, 8),
}


def case_params(*names):
    return [pytest.param(CASES[name], id=name) for name in names or CASES]


def advance(optimizer, scheduler, step_index):
    optimizer.step()
    if isinstance(scheduler, schedulers.ReduceLROnPlateau):
        scheduler.step(PLATEAU_METRICS[step_index])
    else:
        scheduler.step()


def lrs(optimizer):
    return [float(group["lr"]) for group in optimizer.param_groups]


def assert_scaled(optimizer, scheduler, reference_optimizer, reference, factors):
    expected = [factor * lr for factor, lr in zip(factors, lrs(reference_optimizer), strict=True)]
    assert lrs(optimizer) == pytest.approx(expected, rel=1e-6)
    reported = [float(lr) for lr in scheduler.get_last_lr()]
    expected_reported = [factor * float(lr) for factor, lr in zip(factors, reference.get_last_lr(), strict=True)]
    assert reported == pytest.approx(expected_reported, rel=1e-6)


def run_alongside(case, factor=0.5, min_lr=0.0):
    """Steps a reference run and a run reduced after ``case.before`` steps; checks every later step.

    Returns the reduced run's changes and the reference rates seen after the reduction.
    """
    reference_optimizer, optimizer = make_optimizer(case.lrs), make_optimizer(case.lrs)
    reference, scheduler = case.build(reference_optimizer), case.build(optimizer)
    for index in range(case.before):
        advance(reference_optimizer, reference, index)
        advance(optimizer, scheduler, index)
    assert lrs(optimizer) == lrs(reference_optimizer)
    changes = scale_learning_rates([optimizer], [scheduler], factor, min_lr=min_lr)
    factors = [change.new / change.old for change in changes]
    assert_scaled(optimizer, scheduler, reference_optimizer, reference, factors)
    seen = []
    for index in range(case.before, case.before + case.after):
        advance(reference_optimizer, reference, index)
        advance(optimizer, scheduler, index)
        assert_scaled(optimizer, scheduler, reference_optimizer, reference, factors)
        seen.append(lrs(reference_optimizer))
    return changes, seen


@pytest.mark.parametrize("case", case_params())
def test_every_later_step_gives_half_of_the_unreduced_schedule(case):
    changes, seen = run_alongside(case)
    assert [(change.optimizer, change.group) for change in changes] == [(0, i) for i in range(len(case.lrs))]
    assert all(change.new == pytest.approx(0.5 * change.old) for change in changes)
    assert len({tuple(rates) for rates in seen}) >= 2  # the schedule changed the rate while it was checked


@pytest.mark.parametrize("case", case_params("OneCycleLR", "CyclicLR", "CosineAnnealingWarmRestarts", "LambdaLR"))
def test_a_factor_above_one_raises_the_schedule_the_same_way(case):
    changes, _ = run_alongside(case, factor=2.0)
    assert all(change.new == pytest.approx(2.0 * change.old) for change in changes)


def test_min_lr_clamps_a_group_and_leaves_one_below_it_alone():
    lambdas = [lambda e: 0.9**e] * 3
    case = Case(lambda opt: schedulers.LambdaLR(opt, lambdas), before=0, after=8, lrs=(0.1, 0.06, 0.03))
    changes, _ = run_alongside(case, factor=0.5, min_lr=0.04)  # checks the schedule with factors 0.5, 2/3, 1
    assert changes[0] == LrChange(optimizer=0, group=0, old=0.1, new=pytest.approx(0.05))
    assert changes[1] == LrChange(optimizer=0, group=1, old=0.06, new=0.04)  # 0.03 would be below min_lr
    assert changes[2] == LrChange(optimizer=0, group=2, old=0.03, new=0.03)  # already below min_lr


def test_min_lr_clamp_is_exact_on_the_optimizer():
    optimizer = make_optimizer((0.1, 0.06, 0.03))
    scheduler = schedulers.StepLR(optimizer, step_size=2)
    scale_learning_rates([optimizer], [scheduler], 0.5, min_lr=0.04)
    assert lrs(optimizer)[1:] == [0.04, 0.03]
    assert [float(lr) for lr in scheduler.get_last_lr()][1:] == [0.04, 0.03]


def test_cosine_eta_min_is_kept_when_min_lr_gives_groups_different_factors():
    # The documented limitation: one eta_min serves both groups, so it cannot follow two factors.
    reference_optimizer, optimizer = make_optimizer(), make_optimizer()
    reference = schedulers.CosineAnnealingLR(reference_optimizer, T_max=5, eta_min=0.01)
    scheduler = schedulers.CosineAnnealingLR(optimizer, T_max=5, eta_min=0.01)
    changes = scale_learning_rates([optimizer], [scheduler], 0.5, min_lr=0.02)
    assert [change.new for change in changes] == [pytest.approx(0.05), 0.02]  # factors 0.5 and 2/3
    assert scheduler.eta_min == reference.eta_min
    assert scheduler.base_lrs == pytest.approx([0.5 * 0.1, 0.02])
    for index in range(5):
        advance(reference_optimizer, reference, index)
        advance(optimizer, scheduler, index)
    assert lrs(optimizer) == pytest.approx(lrs(reference_optimizer)) == [0.01, 0.01]  # the bottom is not reduced


def test_two_optimizers_are_both_scaled_and_reported_in_order():
    runs = {}
    for name in ("reference", "reduced"):
        first, second = make_optimizer(), make_optimizer()
        runs[name] = [(first, CASES["StepLR"].build(first)), (second, CASES["OneCycleLR"].build(second))]
    for index in range(3):
        for optimizer, scheduler in runs["reference"] + runs["reduced"]:
            advance(optimizer, scheduler, index)
    (first, first_scheduler), (second, second_scheduler) = runs["reduced"]
    before = lrs(first) + lrs(second)
    changes = scale_learning_rates([first, second], [first_scheduler, second_scheduler], 0.5)
    assert [(change.optimizer, change.group) for change in changes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [change.old for change in changes] == before
    assert [change.new for change in changes] == pytest.approx([0.5 * lr for lr in before])
    for index in range(3, 29):  # past the peak at step 8 and StepLR's steps
        for (optimizer, scheduler), (reference_optimizer, reference) in zip(
            runs["reduced"], runs["reference"], strict=True
        ):
            advance(reference_optimizer, reference, index)
            advance(optimizer, scheduler, index)
            assert_scaled(optimizer, scheduler, reference_optimizer, reference, [0.5] * len(lrs(optimizer)))


def test_a_shared_optimizer_and_a_repeated_scheduler_are_scaled_once():
    runs = {}
    for name in ("reference", "reduced"):
        optimizer = make_optimizer()
        warmup = schedulers.LinearLR(optimizer, start_factor=0.2, total_iters=4)
        cosine = schedulers.CosineAnnealingLR(optimizer, T_max=6)
        runs[name] = optimizer, warmup, cosine, schedulers.ChainedScheduler([warmup, cosine])
    reference_optimizer, _, reference_cosine, reference = runs["reference"]
    optimizer, warmup, cosine, chained = runs["reduced"]
    for index in range(2):
        advance(reference_optimizer, reference, index)
        advance(optimizer, chained, index)
    changes = scale_learning_rates([optimizer, optimizer], [chained, cosine, warmup, cosine], 0.5)
    assert len(changes) == 2  # one per param group, not per listing
    assert cosine.base_lrs == pytest.approx([0.5 * lr for lr in reference_cosine.base_lrs])
    assert [group["initial_lr"] for group in optimizer.param_groups] == pytest.approx([0.5 * lr for lr in LRS])
    for index in range(2, 18):
        advance(reference_optimizer, reference, index)
        advance(optimizer, chained, index)
        assert_scaled(optimizer, chained, reference_optimizer, reference, [0.5, 0.5])
        assert cosine.get_last_lr() == pytest.approx([0.5 * lr for lr in reference_cosine.get_last_lr()])


@pytest.mark.parametrize(
    "case",
    case_params(
        "OneCycleLR-three-phase",
        "CyclicLR",
        "CosineAnnealingWarmRestarts",
        "CosineAnnealingLR-eta_min-one-group",
        "ReduceLROnPlateau",
        "SequentialLR",
        "LambdaLR",
        "SWALR",
    ),
)
def test_a_checkpoint_written_after_the_reduction_resumes_with_the_reduced_rates(case):
    reference_optimizer, optimizer = make_optimizer(case.lrs), make_optimizer(case.lrs)
    reference, scheduler = case.build(reference_optimizer), case.build(optimizer)
    for index in range(case.before):
        advance(reference_optimizer, reference, index)
        advance(optimizer, scheduler, index)
    scale_learning_rates([optimizer], [scheduler], 0.5)
    resume_at = case.before + 1
    advance(reference_optimizer, reference, case.before)
    advance(optimizer, scheduler, case.before)
    checkpoint = pickle.loads(pickle.dumps({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}))

    # What resuming does: build both afresh as configured, then load the optimizer's and the scheduler's states.
    resumed_optimizer = make_optimizer(case.lrs)
    resumed = case.build(resumed_optimizer)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["scheduler"])
    assert_scaled(resumed_optimizer, resumed, reference_optimizer, reference, [0.5] * len(case.lrs))
    for index in range(resume_at, case.before + case.after):
        advance(reference_optimizer, reference, index)
        advance(resumed_optimizer, resumed, index)
        assert_scaled(resumed_optimizer, resumed, reference_optimizer, reference, [0.5] * len(case.lrs))


def test_plateau_floors_stay_reduced_when_a_param_group_is_added_later():
    # Adding a group makes ReduceLROnPlateau reset every group's floor to its one default_min_lr.
    runs = []
    for factor in (None, 0.5):
        optimizer = make_optimizer()
        scheduler = schedulers.ReduceLROnPlateau(optimizer, factor=0.5, patience=0, min_lr=0.01)
        if factor:
            scale_learning_rates([optimizer], [scheduler], factor)
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": 0.05})
        runs.append((optimizer, scheduler))
    (reference_optimizer, reference), (optimizer, scheduler) = runs
    for index in range(10):
        advance(reference_optimizer, reference, index)
        advance(optimizer, scheduler, index)
        assert lrs(optimizer)[:2] == pytest.approx([0.5 * lr for lr in lrs(reference_optimizer)[:2]])
    assert lrs(reference_optimizer)[:2] == [0.01, 0.01]  # both reached the floor


def test_tensor_learning_rates_are_scaled_in_place():
    reference_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.1))
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.1))
    reference = schedulers.CosineAnnealingWarmRestarts(reference_optimizer, T_0=3)
    scheduler = schedulers.CosineAnnealingWarmRestarts(optimizer, T_0=3)
    lr_tensor = optimizer.param_groups[0]["lr"]
    scale_learning_rates([optimizer], [scheduler], 0.5)
    assert optimizer.param_groups[0]["lr"] is lr_tensor
    assert lr_tensor.item() == pytest.approx(0.05)
    for index in range(7):
        advance(reference_optimizer, reference, index)
        advance(optimizer, scheduler, index)
        assert_scaled(optimizer, scheduler, reference_optimizer, reference, [0.5])
    assert optimizer.param_groups[0]["lr"] is lr_tensor


class EveryOtherStepHalves(schedulers.LRScheduler):
    """A scheduler type the module does not know; it computes the rate from base_lrs."""

    def get_lr(self):
        return [base_lr * 0.5 ** (self.last_epoch // 2) for base_lr in self.base_lrs]


def test_an_unknown_scheduler_is_scaled_through_base_lrs_and_reported():
    case = Case(EveryOtherStepHalves, before=3, after=6)
    run_alongside(case)
    optimizer = make_optimizer()
    assert unsupported_schedulers([EveryOtherStepHalves(optimizer)]) == ["EveryOtherStepHalves"]


def test_odd_schedulers_do_not_raise_and_are_named_once():
    optimizer = make_optimizer()

    class StepLRVariant(schedulers.StepLR):
        pass

    unknown = EveryOtherStepHalves(optimizer)
    broken = EveryOtherStepHalves(optimizer)
    broken.base_lrs = "not a list"
    chained = schedulers.ChainedScheduler([schedulers.ExponentialLR(optimizer, 0.9), unknown])
    listed = [schedulers.StepLR(optimizer, 2), chained, StepLRVariant(optimizer, 2), object(), None, broken, unknown]
    changes = scale_learning_rates([optimizer], listed, 0.5)
    assert lrs(optimizer) == pytest.approx([0.5 * change.old for change in changes])
    assert unknown.base_lrs == pytest.approx([0.5 * lr for lr in LRS])
    assert broken.base_lrs == "not a list"
    assert unsupported_schedulers(listed) == ["EveryOtherStepHalves", "StepLRVariant", "object", "NoneType"]


def test_covered_schedulers_are_not_reported():
    optimizer = make_optimizer()
    assert unsupported_schedulers([case.build(optimizer) for case in CASES.values()]) == []


def test_schedulers_of_other_optimizers_are_left_alone():
    optimizer, other = make_optimizer(), make_optimizer()
    other_scheduler = schedulers.LambdaLR(other, lambda e: 1.0)
    scale_learning_rates([optimizer], [other_scheduler], 0.5)
    assert lrs(other) == list(LRS)
    assert other_scheduler.base_lrs == list(LRS)


@pytest.mark.parametrize(
    ("factor", "shown"),
    [
        pytest.param(-0.5, "-0.5", id="negative"),
        pytest.param(0, "0", id="zero"),
        pytest.param(math.nan, "nan", id="nan"),
        pytest.param(math.inf, "inf", id="inf"),
        pytest.param("0.5", "'0.5'", id="string"),
        pytest.param(True, "True", id="bool"),
    ],
)
def test_a_bad_factor_is_refused(factor, shown):
    optimizer = make_optimizer()
    message = f"`factor` must be a positive finite number, got {shown}."
    with pytest.raises(ValueError, match=f"^{message.replace('.', '[.]')}$"):
        scale_learning_rates([optimizer], [], factor)
    assert lrs(optimizer) == list(LRS)


@pytest.mark.parametrize(
    ("min_lr", "shown"),
    [
        pytest.param(-1e-3, "-0.001", id="negative"),
        pytest.param(math.nan, "nan", id="nan"),
        pytest.param(math.inf, "inf", id="inf"),
        pytest.param(None, "None", id="none"),
    ],
)
def test_a_bad_min_lr_is_refused(min_lr, shown):
    optimizer = make_optimizer()
    with pytest.raises(ValueError, match=rf"^`min_lr` must be a finite number >= 0, got {shown}\.$"):
        scale_learning_rates([optimizer], [], 0.5, min_lr=min_lr)
    assert lrs(optimizer) == list(LRS)
