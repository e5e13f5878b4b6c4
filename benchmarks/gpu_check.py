"""The GPU checks, in one script for a machine with a CUDA device.

1. Sync check: the package's host-synchronisation tests (``tests/test_host_syncs.py``), whose
   CUDA test trains with every lightning-actguard callback under
   ``torch.cuda.set_sync_debug_mode("error")`` on every step that does not close a window, so
   that any host synchronisation on those steps raises. The steps that close a window are left
   alone: they read the window back once, by design.
2. Overhead: the benchmark of ``overhead.py`` on the GPU (plain against plain, every callback with
   their defaults, every callback measuring every batch), without the speed correction, which
   needs the CPU's synchronous backward pass.

    python benchmarks/gpu_check.py                          # on a CUDA machine (about 3 minutes)
    python benchmarks/gpu_check.py --device cpu --pairs 2   # smoke test of the benchmark part
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
import overhead

ROOT = Path(__file__).parent.parent


def sync_check() -> str:
    """Runs the host-synchronisation tests (their report is printed above the tables)."""
    code = pytest.main(["-q", "-rs", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_host_syncs.py")])
    return "passed" if code == pytest.ExitCode.OK else f"FAILED (pytest exit code {int(code)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--pairs", type=int, default=6, help="timed plain/monitored pairs of blocks per run")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --device cpu for a smoke test.")
    overhead.quiet()
    models = ["MLP 8x512, batch 256", "CNN 4 conv, batch 128"]
    verdict = sync_check() + ("" if args.device == "cuda" else " (its CUDA test skipped: no GPU)")
    configs = ["plain vs plain", "everything (defaults)", "everything, every batch (overhead_budget=None)"]
    rows = [
        overhead.measure(name, *overhead.MODELS[name], config, args.pairs, device=args.device)
        for name in models
        for config in configs
    ]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{device_name}, torch {torch.__version__}, Lightning {pl.__version__}")
    print(f"Sync check (tests/test_host_syncs.py): {verdict}")
    overhead.print_table(rows, f"Overhead on {device_name}")


if __name__ == "__main__":
    main()
