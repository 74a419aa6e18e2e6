"""A/B of register's warp stage and of register-batch's loop on the real-anatomy pairs (1 mm).

    PYTHONPATH=<tree>/workflow .venv/bin/python experiments/warp_ab.py MODEL {torch,compiled} [--batch OUT]

Without ``--batch``: one pair registered 8 times in one process (2 threads), the median and
minimum warp seconds of the last 7 (the stage of ``Registrar.register``). With ``--batch OUT``:
the three pairs listed three times through ``register_batch`` (``.nii`` outputs under OUT), the
loop's seconds a pair and each stage's median. ``torch``/``compiled`` picks ``Registrar``'s
``compiled_warp`` where the tree has it (older trees: their only path). Hold torch to AVX2 with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` for the proxy figures.
"""
import argparse
import inspect
import shutil
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from ldreg.register import Registrar

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "resources" / "real_anatomy"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("mode", choices=["torch", "compiled"])
    parser.add_argument("--batch", help="output folder: time register-batch's loop instead")
    parser.add_argument("--refine-steps", default="0", help="register's --refine-steps (0: the network alone)")
    args = parser.parse_args()
    try:
        from ldreg.allocator import keep_freed_memory
        keep_freed_memory()
    except ImportError:  # trees before the allocator
        pass
    torch.set_num_threads(2)
    options = {"compiled_warp": args.mode == "compiled"} if "compiled_warp" in inspect.signature(Registrar).parameters else {}
    t = time.perf_counter()
    levels = ()
    if args.refine_steps != "0":  # (older trees: the network alone only)
        from ldreg.methods import parse_refine_steps
        from ldreg.optimise import refine_schedule
        levels = refine_schedule(parse_refine_steps(args.refine_steps))
    registrar = Registrar(args.model, channels_last=True, refine_levels=levels, **options)
    load = time.perf_counter() - t
    if not args.batch:
        seconds = [registrar.register(PAIRS / "moved1_image.nii.gz", PAIRS / "fixed_image.nii.gz",
                                      PAIRS / "moved1_labels.nii.gz")["times"]["warp"] for _ in range(8)][1:]
        print(f"{args.mode}: load {load:.2f} s; warp median {statistics.median(seconds):.4f} s, min {min(seconds):.4f} s")
        return
    from ldreg.batch import BatchOptions, batch_pairs, register_batch

    rows = [{"pair_id": f"p{k}_{r}", "moving": PAIRS / f"moved{k}_image.nii.gz", "fixed": PAIRS / "fixed_image.nii.gz",
             "moving_labels": PAIRS / f"moved{k}_labels.nii.gz"} for r in range(3) for k in (1, 2, 3)]
    out = Path(args.batch)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(out / "pairs.csv", index=False)
    t = time.perf_counter()
    summary = register_batch(registrar, batch_pairs(out / "pairs.csv"), out / "registered",
                             BatchOptions(suffix=".nii", compiled_warp=args.mode == "compiled"), show_progress=False)
    loop = time.perf_counter() - t
    stages = " ".join(f"{c}={summary[c].median():.3f}" for c in summary.columns if c.endswith("_s"))
    print(f"{args.mode}: load {load:.2f} s; loop {loop / len(summary):.3f} s a pair; stage medians {stages}")


if __name__ == "__main__":
    main()
