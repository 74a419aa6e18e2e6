"""Refinement schedules on a list of pairs at their own resolution, timed as the tables time a
method (`ldreg.native.evaluate_native`: each pair registered alone on all the threads, `.nii`
outputs, then scored), with Greedy's settings beside them in the same process.

    python experiments/refine_schedules.py PAIRS.csv OUT.csv MODEL [--threads 2] \
        [--greedy fast ...] K:MM,MM [K:MM,MM ...] [MMxN,MMxN ...]

``K:MM,MM`` is ``register --refine-steps K --refine-spacings MM,MM`` (K iterations at the first
level, half as many at each next); ``MMxN,MMxN`` sets each level's iterations itself (``4x20,3x10,2x3``:
20 at 4 mm, 10 at 3 mm, 3 at 2 mm: ``register --refine-steps 20x10x3 --refine-spacings 4,3,2``). PAIRS.csv has the columns
moving, moving_labels, fixed, fixed_labels (``ldreg register-batch``'s with labels). Prints and
writes one row per setting: mean Dice, median seconds a pair and per stage.
"""
import argparse
import sys

import pandas as pd
import torch

from ldreg.allocator import keep_freed_memory
from ldreg.methods import greedy_method, parse_method, refined_method
from ldreg.native import evaluate_native, native_runner
from ldreg.settings import RunSettings, load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs")
    parser.add_argument("out")
    parser.add_argument("model")
    parser.add_argument("settings", nargs="+", help="K:MM,MM (refinement steps: spacings) or MMxN,MMxN (each level)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--greedy", action="append", default=[], help="a Greedy setting of config.yaml (repeatable)")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    pairs = pd.read_csv(args.pairs)
    greedy = RunSettings.from_config(load_config()).greedy
    runs = [(greedy_method(g), None) for g in args.greedy]
    for setting in args.settings:
        if ":" in setting:
            steps, spacings = setting.split(":")
            runs.append((refined_method("model", int(steps)), tuple(float(s) for s in spacings.split(","))))
        else:  # each level's own iterations: register --refine-steps AxBxC --refine-spacings MM,MM
            levels = [level.split("x") for level in setting.split(",")]
            steps = tuple(int(k) for _, k in levels)
            runs.append((refined_method("model", steps if len(steps) > 1 else steps[0]), tuple(float(mm) for mm, _ in levels)))
    rows = []
    for name, spacings in runs:
        method = parse_method(name)
        run = native_runner(method, args.model, spacings=spacings, greedy_settings=greedy, threads=args.threads)
        label = name if not spacings else (
            ",".join(f"{s:g}x{k}" for s, k in zip(spacings, method.steps)) if isinstance(method.steps, tuple)
            else f"{method.steps}:{','.join(f'{s:g}' for s in spacings)}")
        per_pair, _ = evaluate_native(name, run, pairs, with_hd95=False, show_progress=False)
        stages = [c for c in per_pair.columns if c.endswith("_s")]
        row = {"setting": label, "dice": per_pair.dice.mean(), "seconds": per_pair.seconds.median(),
               **{c: per_pair[c].median() for c in stages}, "folding_percent": 100 * per_pair.folding_fraction.max()}
        # stderr: Greedy prints its iterations on stdout
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, file=sys.stderr, flush=True)
        rows.append(row)
    pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
