"""Experiment: per-pair optimisation settings (ldreg.optimise.optimise_field) on the default
run's test pairs: Dice, EPE, folding and seconds per pair for each setting, one change at a time.

    python experiments/optimiser_sweep.py results results/experiments/optimiser_sweep.csv [base|coarse]

Reads the default run's data (and, for the rows started from a model, its model files); writes
one row per setting. Threads: torch's default (all cores). Not part of `all`: a research tool
(docs/experiments.md has the figures and the machine)."""
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from ldreg.engines import cpu_summary
from ldreg.evaluate import evaluate_pairs, flow_predictor, summary
from ldreg.io import write_csv
from ldreg.optimise import optimise_field

BASE = {"lr": 0.5, "resolution": 0.5, "schedule": "constant", "smoothness_weight": 1.0}
SETTINGS = [  # (start model or None, steps, changes from BASE)
    (None, 10, {}), (None, 20, {}),
    (None, 10, {"lr": 1.0}), (None, 20, {"lr": 1.0}),
    (None, 10, {"resolution": 0.25}), (None, 20, {"resolution": 0.25}),
    (None, 10, {"lr": 1.0, "resolution": 0.25}), (None, 20, {"lr": 1.0, "resolution": 0.25}),
    (None, 20, {"lr": 1.0, "schedule": "cosine"}),
    ("teacher", 5, {}), ("teacher", 10, {}),
    ("student_unsupervised", 5, {}), ("student_unsupervised", 10, {}),
]
# after the base set: lr 1 on a quarter-resolution residual, then coarse to fine on top of it
BEST = {"lr": 1.0, "resolution": 0.25}
COARSE = [
    (None, 5, BEST), (None, 10, {**BEST, "resolution": 0.125}), (None, 20, {**BEST, "resolution": 0.125}),
    (None, 20, {**BEST, "coarse_fraction": 0.5}), (None, 30, {**BEST, "coarse_fraction": 0.67}),
    ("teacher", 5, BEST), ("teacher", 10, BEST),
    ("student_unsupervised", 5, BEST), ("student_unsupervised", 10, BEST),
]


def main(results, out_csv, which="base"):
    results = Path(results)
    subjects = pd.read_csv(results / "data" / "subjects.csv")
    pairs = pd.read_csv(results / "data" / "pairs.csv")
    test = pairs[pairs.split == "test"]
    rows = []
    for start_model, steps, change in {"base": SETTINGS, "coarse": COARSE}[which]:
        opts = {**BASE, **change}
        start = flow_predictor("identity") if start_model is None else flow_predictor(
            "model", results / "models" / f"{start_model}.pt")

        def predict(m, f, steps=steps, opts=opts, start=start):
            field, _ = optimise_field(m, f, start(m, f), steps, **opts)
            return field

        t = time.perf_counter()
        per_pair, _ = evaluate_pairs("sweep", predict, subjects, test, 3.0, with_hd95=False, show_progress=False)
        row = {"start": start_model or "zero", "steps": steps, **opts, **summary(per_pair),
               "s_per_pair": per_pair.predict_s.mean(), "threads": torch.get_num_threads(), "cpu": cpu_summary()}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "cpu"},
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        write_csv(pd.DataFrame(rows), out_csv)


if __name__ == "__main__":
    main(*sys.argv[1:4])
