"""The GPU checks, in one script for a machine with a CUDA device.

1. Sync check: trains the benchmark models on the GPU with every lightning-actguard callback,
   with ``torch.cuda.set_sync_debug_mode("error")`` on every step that does not close a window,
   so that any host synchronisation on those steps raises with its traceback. The steps that
   close a window are left alone: they read the window back once, by design.
2. Overhead: the benchmark of ``overhead.py`` on the GPU (plain against plain, every callback with
   their defaults, every callback measuring every batch), without the speed correction, which
   needs the CPU's synchronous backward pass.

    python benchmarks/gpu_check.py                 # on a CUDA machine; prints two tables (about 3 minutes)
    python benchmarks/gpu_check.py --device cpu --pairs 2   # smoke test of the script itself (no sync check)
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import overhead

WINDOW = 10


class SyncDebug(pl.Callback):
    """Raises on any host synchronisation during steps that do not close a window."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        closes_window = (trainer.global_step + 1) % WINDOW == 0
        torch.cuda.set_sync_debug_mode(0 if closes_window or trainer.global_step < 2 else "error")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        torch.cuda.set_sync_debug_mode(0)


def sync_check(name: str, make_net: object, shape: tuple[int, ...], batch: int, device: str) -> tuple[str, str]:
    data = TensorDataset(torch.randn(batch * 4, *shape), torch.randint(0, 10, (batch * 4,)))
    callbacks = [*overhead.everything(histograms=True), SyncDebug()] if device == "cuda" else overhead.everything()
    for callback in callbacks:
        if hasattr(callback, "every_n_steps"):
            callback.every_n_steps = WINDOW
        if hasattr(callback, "histogram_every_n_steps") and callback.histogram_every_n_steps:
            callback.histogram_every_n_steps = 2 * WINDOW
    trainer = pl.Trainer(
        max_steps=3 * WINDOW,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator=device,
        devices=1,
    )
    try:
        trainer.fit(overhead.Classifier(make_net()), DataLoader(data, batch_size=batch))  # type: ignore[operator]
    except RuntimeError as error:
        frames = [line for line in traceback.format_exc().splitlines() if "File" in line][-4:]
        return name, f"FAILED: {error} | " + " / ".join(frame.strip() for frame in frames)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    return name, "no host sync off the window ends" if device == "cuda" else "ran (no sync check on CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--pairs", type=int, default=6, help="timed plain/monitored pairs of blocks per run")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --device cpu for a smoke test.")
    overhead.quiet()
    models = ["MLP 8x512, batch 256", "CNN 4 conv, batch 128"]
    checks = [sync_check(name, *overhead.MODELS[name], args.device) for name in models]
    configs = ["plain vs plain", "everything (defaults)", "everything, every batch (overhead_budget=None)"]
    rows = [
        overhead.measure(name, *overhead.MODELS[name], config, args.pairs, device=args.device)
        for name in models
        for config in configs
    ]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{device_name}, torch {torch.__version__}, Lightning {pl.__version__}")
    print("| model | sync check |\n|---|---|")
    for name, verdict in checks:
        print(f"| {name} | {verdict} |")
    overhead.print_table(rows, f"Overhead on {device_name}")


if __name__ == "__main__":
    main()
