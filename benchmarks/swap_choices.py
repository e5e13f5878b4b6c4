"""Which activation a guard should swap in, measured on two broken MLPs trained on scikit-learn digits.

Plain script, not a test; plain torch training loops, one CPU thread.

1. Stalled saturating net: ``depth`` hidden layers of Linear(64, 64) + Sigmoid, then Linear(64, 10),
   PyTorch's default init. It trains ``--stall-steps`` steps (where it sits at a loss near 2.30),
   then every Sigmoid is swapped to a candidate and training goes on for ``--after-steps`` steps.
2. Dead ReLU net: 4 hidden layers of Linear(64, 64) + ReLU, trained 30 steps with SGD at lr 5,
   which kills most units; then the lr drops to 0.05 and the layers with more than half their
   units dead (the library's ``DIAGNOSIS_LIMITS["dead_frac"]``) keep ReLU or are swapped, and
   training goes on for ``--after-steps`` steps.

Each candidate runs with the feeding layers as they are and, in the "suited init" columns, with
``init_for_activation`` applied to them at the swap. A swap is done as a guard does it mid-run:
the optimizer and its state are kept (``--fresh-optimizer`` rebuilds it instead), and a PReLU's new
slopes are handed to it with ``adopt_parameters``.

Data: the 1797 digits with pixels divided by 16 (inputs in [0, 1], not standardised); the first
1500 samples train, the other 297 are held out. Batches of 64 are drawn without replacement,
epoch by epoch. Every branch after a swap starts from a copy of the same trained model and sees
the same batches, so the candidates differ only in the swap. A cell is the mean over seeds ±
half the range between the lowest and highest seed; a run whose loss turned NaN is left out of
it and counted as diverged.

    python benchmarks/swap_choices.py                 # the tables in the docs (3 + 8 seeds, ~6 min)
    python benchmarks/swap_choices.py --quick         # 1 seed, shorter runs: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_actguard.diagnosis import DIAGNOSIS_LIMITS
from lightning_actguard.param_groups import adopt_parameters
from lightning_actguard.revive import feeding_layer
from lightning_actguard.swap import init_for_activation, swap_activations

WIDTH = 64
BATCH = 64
TRAIN_SAMPLES = 1500
LOSS_WINDOW = 20  # the reported training loss is the mean of the last LOSS_WINDOW steps
RECOVERED = 0.5  # held-out accuracy from which a dead ReLU net counts as trained again
# Offsets that keep the random streams of one seed apart (model init, batches, re-init at the swap).
BATCHES_AFTER_SWAP = 10_000
REINIT = 20_000

Factory = Callable[[], nn.Module]
MakeOptimizer = Callable[..., torch.optim.Optimizer]

SATURATED_CANDIDATES: dict[str, Factory | None] = {
    "no swap": None,
    "ReLU": nn.ReLU,
    "LeakyReLU(0.01)": partial(nn.LeakyReLU, 0.01),
    "GELU": nn.GELU,
    "ELU": nn.ELU,
    "SELU": nn.SELU,
    "Tanh": nn.Tanh,
    "PReLU": nn.PReLU,
}
DEAD_CANDIDATES: dict[str, Factory | None] = {
    "keep ReLU": None,
    "LeakyReLU(0.01)": partial(nn.LeakyReLU, 0.01),
    "LeakyReLU(0.1)": partial(nn.LeakyReLU, 0.1),
    "ELU": nn.ELU,
    "SELU": nn.SELU,
    "GELU": nn.GELU,
    "PReLU": nn.PReLU,
}
OPTIMIZERS: dict[str, MakeOptimizer] = {
    "SGD lr 0.05": partial(torch.optim.SGD, lr=0.05),
    "Adam lr 1e-3": partial(torch.optim.Adam, lr=1e-3),
}


# ---------------------------------------------------------------------- data and training


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor


def load_data() -> Digits:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    return Digits(x[:TRAIN_SAMPLES], y[:TRAIN_SAMPLES], x[TRAIN_SAMPLES:], y[TRAIN_SAMPLES:])


class Batches:
    """Batch indices without replacement, a fresh permutation every epoch (the short tail is dropped)."""

    def __init__(self, samples: int, seed: int) -> None:
        self.samples = samples
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[torch.Tensor] = []

    def next(self) -> torch.Tensor:
        if not self.pending:
            order = torch.randperm(self.samples, generator=self.generator)
            self.pending = list(order[: self.samples - self.samples % BATCH].split(BATCH))[::-1]
        return self.pending.pop()


def mlp(depth: int, activation: Factory) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(depth):
        layers += [nn.Linear(64 if index == 0 else WIDTH, WIDTH), activation()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Digits, batches: Batches, steps: int) -> float:
    """Train ``steps`` steps; the mean training loss of the last LOSS_WINDOW of them (nan if it diverged)."""
    model.train()
    losses = []
    for _ in range(steps):
        index = batches.next()
        loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-LOSS_WINDOW:]
    return statistics.fmean(tail) if all(math.isfinite(value) for value in tail) else math.nan


@torch.no_grad()
def held_out_accuracy(model: nn.Module, data: Digits) -> float:
    model.eval()
    return (model(data.x_held).argmax(1) == data.y_held).float().mean().item()


@torch.no_grad()
def dead_fractions(model: nn.Sequential, x: torch.Tensor) -> dict[str, float]:
    """Per activation: share of its units whose input (pre-activation) is never > 0 over ``x``.

    For ReLU that is "output never > 0"; measuring the input keeps the same meaning after a swap
    (a LeakyReLU unit with a negative input is not firing, even though it still passes a gradient).
    """
    fractions = {}
    hidden = x
    for name, module in model.named_children():
        inputs, hidden = hidden, module(hidden)
        if not isinstance(module, nn.Linear):
            fractions[name] = ((inputs > 0).sum(0) == 0).float().mean().item()
    return fractions


# ---------------------------------------------------------------------- the swap, as a guard does it


@dataclass(frozen=True)
class Branch:
    replacement: Factory | None
    suited_init: bool


def branches(candidates: dict[str, Factory | None], init_without_swap: bool) -> dict[tuple[str, bool], Branch]:
    """Every candidate with and without suited init, where init changes anything."""
    runs = {}
    for name, factory in candidates.items():
        runs[name, False] = Branch(factory, False)
        # Ask init_for_activation itself (on a throwaway layer) whether it has a scheme for the candidate.
        suits = factory is not None and init_for_activation(nn.Linear(1, 1), factory()) is not None
        if suits or (factory is None and init_without_swap):
            runs[name, True] = Branch(factory, True)
    return runs


def swapped_copy(
    trained: nn.Sequential,
    optimizer_state: dict,
    make_optimizer: MakeOptimizer,
    branch: Branch,
    layers: Sequence[str],
    seed: int,
    fresh_optimizer: bool,
) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """A copy of ``trained`` whose activations ``layers`` are swapped and re-initialised as ``branch`` says.

    With its optimizer: a copy of the trained one (state included) that adopts the new parameters,
    or a fresh one built after the swap.
    """
    model = copy.deepcopy(trained)
    optimizer = make_optimizer(model.parameters())
    if not fresh_optimizer:
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))
    activations = {name: model.get_submodule(name) for name in layers}
    if branch.replacement is not None and layers:
        selector = type(activations[layers[0]])
        report = swap_activations(model, {selector: branch.replacement()}, include=layers)
        activations = {swap.name: swap.new for swap in report.swaps}
        if fresh_optimizer:
            optimizer = make_optimizer(model.parameters())
        else:
            adopt_parameters(model, [optimizer], report.new_parameters())
    if branch.suited_init:
        torch.manual_seed(seed + REINIT)  # the same draws for every candidate of this seed
        for name, activation in activations.items():
            found = feeding_layer(model, name)
            if found is not None:
                init_for_activation(found[1], activation)
    return model, optimizer


@dataclass(frozen=True)
class Outcome:
    loss: float
    accuracy: float
    dead_all: float = math.nan
    dead_swapped: float = math.nan


def outcome(model: nn.Sequential, data: Digits, loss: float, swapped: Sequence[str] = ()) -> Outcome:
    if not math.isfinite(loss):
        return Outcome(math.nan, math.nan, math.nan, math.nan)
    dead = dead_fractions(model, data.x_held)
    swapped_dead = [dead[name] for name in swapped]
    return Outcome(
        loss,
        held_out_accuracy(model, data),
        statistics.fmean(dead.values()),
        statistics.fmean(swapped_dead) if swapped_dead else math.nan,
    )


# ---------------------------------------------------------------------- the two experiments


def saturated_seed(
    data: Digits, depth: int, optimizer_name: str, seed: int, args: argparse.Namespace
) -> tuple[Outcome, dict[tuple[str, bool], Outcome]]:
    """One seed of the stalled sigmoid net: the state at the swap, and every candidate after it."""
    make_optimizer = OPTIMIZERS[optimizer_name]
    torch.manual_seed(seed)
    model = mlp(depth, nn.Sigmoid)
    optimizer = make_optimizer(model.parameters())
    at_swap = outcome(model, data, train(model, optimizer, data, Batches(TRAIN_SAMPLES, seed), args.stall_steps))
    layers = [name for name, module in model.named_children() if isinstance(module, nn.Sigmoid)]
    state = optimizer.state_dict()
    after = {}
    for key, branch in branches(SATURATED_CANDIDATES, init_without_swap=False).items():
        swapped, swapped_optimizer = swapped_copy(
            model, state, make_optimizer, branch, layers, seed, args.fresh_optimizer
        )
        batches = Batches(TRAIN_SAMPLES, seed + BATCHES_AFTER_SWAP)
        after[key] = outcome(swapped, data, train(swapped, swapped_optimizer, data, batches, args.after_steps))
    return at_swap, after


@dataclass(frozen=True)
class Killed:
    loss: float
    accuracy: float
    dead: dict[str, float]
    swapped: list[str]


def dead_seed(data: Digits, seed: int, args: argparse.Namespace) -> tuple[Killed, dict[tuple[str, bool], Outcome]]:
    """One seed of the dead ReLU net: the state after the too-high lr, and every candidate after the swap."""
    torch.manual_seed(seed)
    model = mlp(args.dead_depth, nn.ReLU)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.kill_lr)
    loss = train(model, optimizer, data, Batches(TRAIN_SAMPLES, seed), args.kill_steps)
    if not math.isfinite(loss):  # the high lr blew the weights up instead of killing units: nothing to swap
        return Killed(loss, math.nan, {}, []), {}
    dead = dead_fractions(model, data.x_held)
    layers = [name for name, fraction in dead.items() if fraction > DIAGNOSIS_LIMITS["dead_frac"]]
    killed = Killed(loss, held_out_accuracy(model, data), dead, layers)
    for group in optimizer.param_groups:
        group["lr"] = args.recover_lr
    state = optimizer.state_dict()
    make_optimizer = partial(torch.optim.SGD, lr=args.recover_lr)
    after = {}
    for key, branch in branches(DEAD_CANDIDATES, init_without_swap=True).items():
        swapped, swapped_optimizer = swapped_copy(
            model, state, make_optimizer, branch, layers, seed, args.fresh_optimizer
        )
        batches = Batches(TRAIN_SAMPLES, seed + BATCHES_AFTER_SWAP)
        loss = train(swapped, swapped_optimizer, data, batches, args.after_steps)
        after[key] = outcome(swapped, data, loss, layers)
    return killed, after


# ---------------------------------------------------------------------- tables


def cell(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """Mean ± half the range over seeds; diverged seeds are left out and counted."""
    finite = [value * scale for value in values if math.isfinite(value)]
    if not finite:
        return "diverged" if values else "-"
    text = f"{statistics.fmean(finite):.{digits}f} ± {(max(finite) - min(finite)) / 2:.{digits}f}"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)}/{len(values)} diverged)"
    return text


def loss_cell(outcomes: Sequence[Outcome]) -> str:
    return cell([result.loss for result in outcomes])


def accuracy_cell(outcomes: Sequence[Outcome]) -> str:
    return cell([result.accuracy for result in outcomes], scale=100.0, digits=1)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [f"| {' | '.join(header)} |", f"|{'|'.join('---' for _ in header)}|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def run_saturated(data: Digits, args: argparse.Namespace) -> None:
    print(
        f"## Stalled sigmoid MLP: {args.stall_steps} steps, swap every Sigmoid, {args.after_steps} more steps\n\n"
        f"Loss: training cross-entropy, mean of the last {LOSS_WINDOW} steps. Accuracy: held-out, 297 samples, "
        f"%. Mean ± half the range over seeds {list(args.seeds)}. Suited init: init_for_activation on every hidden "
        f"Linear at the swap; '-' where it has no scheme for the activation.\n"
    )
    for optimizer_name in OPTIMIZERS:
        for depth in args.depths:
            at_swap: list[Outcome] = []
            after: dict[tuple[str, bool], list[Outcome]] = {}
            for seed in args.seeds:
                before, results = saturated_seed(data, depth, optimizer_name, seed, args)
                at_swap.append(before)
                for key, result in results.items():
                    after.setdefault(key, []).append(result)
            print(
                f"### {optimizer_name}, depth {depth}\n\nAt the swap (step {args.stall_steps}): loss "
                f"{loss_cell(at_swap)}, held-out accuracy {accuracy_cell(at_swap)} %.\n"
            )
            rows = [
                [
                    name,
                    loss_cell(after[name, False]),
                    accuracy_cell(after[name, False]),
                    loss_cell(after.get((name, True), [])),
                    accuracy_cell(after.get((name, True), [])),
                ]
                for name in SATURATED_CANDIDATES
            ]
            header = ["Sigmoid ->", "loss", "accuracy %", "loss, suited init", "accuracy %, suited init"]
            print(table(header, rows) + "\n", flush=True)


def run_dead(data: Digits, args: argparse.Namespace) -> None:
    print(
        f"## Dead ReLU MLP: depth {args.dead_depth}, SGD lr {args.kill_lr} for {args.kill_steps} steps, then lr "
        f"{args.recover_lr} for {args.after_steps} steps\n\n"
        f"Dead: share of units whose pre-activation is never > 0 over the held-out set (for ReLU: output never > 0). "
        f"Swapped: the layers more than {DIAGNOSIS_LIMITS['dead_frac']:.0%} dead after the high-lr phase. "
        f"Mean ± half the range over seeds {list(args.dead_seeds)}, less any whose high-lr phase diverged.\n"
    )
    killed: list[Killed] = []
    after: dict[tuple[str, bool], list[Outcome]] = {}
    for seed in args.dead_seeds:
        state, results = dead_seed(data, seed, args)
        killed.append(state)
        for key, result in results.items():
            after.setdefault(key, []).append(result)
    rows = [
        [
            str(seed),
            f"{state.loss:.3f}",
            f"{100 * state.accuracy:.1f}",
            " / ".join(f"{fraction:.2f}" for fraction in state.dead.values()) or "-",
            ", ".join(state.swapped) if state.dead else "diverged: seed left out",
        ]
        for seed, state in zip(args.dead_seeds, killed, strict=True)
    ]
    names = ", ".join(str(2 * index + 1) for index in range(args.dead_depth))  # the activations of mlp()
    header = ["seed", "loss", "accuracy %", f"dead fraction, layers {names}", "swapped layers"]
    print(f"After the high-lr phase:\n\n{table(header, rows)}\n")
    rows = []
    for (name, suited), outcomes in after.items():
        label = f"{name} + suited init" if suited else name
        rows.append(
            [
                label,
                loss_cell(outcomes),
                accuracy_cell(outcomes),
                cell([result.dead_all for result in outcomes], digits=2),
                cell([result.dead_swapped for result in outcomes], digits=2),
                f"{sum(result.accuracy >= RECOVERED for result in outcomes)}/{len(outcomes)}",
            ]
        )
    header = [
        "dead layers' ReLU ->",
        "loss",
        "accuracy %",
        "dead, all layers",
        "dead, swapped layers",
        f"seeds >= {RECOVERED:.0%} accuracy",
    ]
    print(f"After {args.after_steps} steps at lr {args.recover_lr}:\n\n{table(header, rows)}\n", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...) of the sigmoid net")
    parser.add_argument(
        "--dead-seeds", type=int, default=8, help="number of seeds of the dead ReLU net (cheap, and noisier)"
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 12, 16], help="sigmoid net depths")
    parser.add_argument("--stall-steps", type=int, default=150)
    parser.add_argument("--after-steps", type=int, default=300, help="steps after the swap, in both experiments")
    parser.add_argument("--dead-depth", type=int, default=4)
    parser.add_argument("--kill-lr", type=float, default=5.0)
    parser.add_argument("--kill-steps", type=int, default=30)
    parser.add_argument("--recover-lr", type=float, default=0.05)
    parser.add_argument("--part", choices=["both", "saturated", "dead"], default="both")
    parser.add_argument(
        "--fresh-optimizer", action="store_true", help="rebuild the optimizer at the swap instead of keeping its state"
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, depths 8 and 16, 60 + 100 steps: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.dead_seeds, args.depths, args.stall_steps, args.after_steps = 1, 1, [8, 16], 60, 100
    args.seeds, args.dead_seeds = range(args.seeds), range(args.dead_seeds)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    data = load_data()
    start = time.perf_counter()
    optimizer_note = "rebuilt at the swap" if args.fresh_optimizer else "kept across the swap, state included"
    print(f"# Activation swap choices (torch {torch.__version__}, 1 thread; optimizer {optimizer_note})\n")
    if args.part in ("both", "saturated"):
        run_saturated(data, args)
    if args.part in ("both", "dead"):
        run_dead(data, args)
    print(f"Wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
