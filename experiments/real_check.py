"""Models compared on the real-anatomy check with more pairs than the tables' three: each model
alone and + register's refinement, timed and scored as the native tables do (each pair alone on
all the threads, `.nii` outputs), with a paired test of every row against one reference row.

    python experiments/real_check.py OUT_DIR NAME=MODEL.pt [NAME=MODEL.pt ...] \
        [--seeds 0 1 2] [--pairs 3] [--refine-steps 10x10x2] [--threads 2] [--against NAME]

The moved copies of Colin27 are made once per seed under OUT_DIR/pairs_seed<S>/ (seed 0's are
the tables' own pairs; seeds 7-9 were the refinement's tuning pairs: leave them out here).
Writes OUT_DIR/per_pair.csv (one row per method and pair, for further paired tests) and
OUT_DIR/summary.csv (mean Dice, HD95-free; median seconds; Dice difference against
``--against``'s row of the same kind and its Wilcoxon p over the pairs).
"""
import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from ldreg.allocator import keep_freed_memory
from ldreg.defaults import REFINE_STEPS
from ldreg.methods import parse_method, parse_refine_steps, refined_method
from ldreg.native import evaluate_native, native_runner
from ldreg.real_anatomy import RealAnatomyConfig, make_real_anatomy_pairs
from ldreg.report import paired_test


def real_pairs(out_dir: Path, seeds: list[int], pairs: int) -> pd.DataFrame:
    """The moved copies of every seed, made once, with pair ids unique across seeds."""
    frames = []
    for seed in seeds:
        folder = out_dir / f"pairs_seed{seed}"
        listing = folder / "pairs.csv"
        table = pd.read_csv(listing) if listing.exists() else make_real_anatomy_pairs(
            RealAnatomyConfig(seed=seed, pairs=pairs), folder)  # which writes the listing
        frames.append(table.assign(pair_id=[f"seed{seed}_{p}" for p in table.pair_id]))
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("models", nargs="+", help="NAME=MODEL.pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pairs", type=int, default=3, help="moved copies a seed")
    parser.add_argument("--refine-steps", type=parse_refine_steps, default=REFINE_STEPS,
                        help="register's refinement, K or AxBxC (default: register's; 0: the network alone only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against", help="the reference model's NAME (default: the first)")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    models = dict(m.split("=", 1) for m in args.models)
    pairs = real_pairs(args.out_dir, args.seeds, args.pairs)
    rows = []
    for name, path in models.items():
        for method in [name] + ([refined_method(name, args.refine_steps)] if args.refine_steps else []):
            run = native_runner(parse_method(method), path, threads=args.threads)
            per_pair, _ = evaluate_native(method, run, pairs, with_hd95=False, show_progress=False)
            rows.append(per_pair.assign(method=method, model=name))
            print(f"{method}: Dice {per_pair.dice.mean():.4f}, {per_pair.seconds.median():.2f} s a pair",
                  file=sys.stderr, flush=True)
    per_pair = pd.concat(rows, ignore_index=True)
    per_pair.to_csv(args.out_dir / "per_pair.csv", index=False)
    against = args.against or next(iter(models))
    summary = []
    for method, group in per_pair.groupby("method", sort=False):
        reference = method.replace(group.model.iloc[0], against, 1)
        test = paired_test(per_pair, method, reference) if reference != method else {}
        summary.append({"method": method, "dice": group.dice.mean(), "dice_sd": group.dice.std(),
                        "seconds": group.seconds.median(), "pairs": len(group), "against": reference,
                        "dice_diff": test.get("dice_diff_vs_unsupervised"), "wilcoxon_p": test.get("wilcoxon_p")})
    summary = pd.DataFrame(summary)
    summary.to_csv(args.out_dir / "summary.csv", index=False)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
