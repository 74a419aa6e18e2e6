"""Experiment: do runs of one configuration give the same verdict (issue 12 item 5)?

    python experiments/compare_runs.py OUT_STEM RUN_DIR [RUN_DIR ...]

Reads each RUN_DIR/tables/accuracy.csv and writes OUT_STEM_methods.{csv,md} (each method's Dice
and rank per run) and OUT_STEM_agreement.{csv,md} (Kendall's tau and the swapped pairs of methods
against the first run; ldreg.report.run_agreement). Not part of `all`."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from ldreg.report import run_agreement, write_table


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    out, runs = argv[0], argv[1:]
    accuracies = {}
    for run in runs:
        path = Path(run) / "tables" / "accuracy.csv"
        if not path.exists():
            raise SystemExit(f"{path}: no accuracy table (run the workflow into {run} first)")
        accuracies[Path(run).name] = pd.read_csv(path)
    methods, agreement = run_agreement(accuracies)
    write_table(methods, f"{out}_methods")
    write_table(agreement, f"{out}_agreement")
    print(methods.to_string(index=False))
    print(agreement.drop(columns="swapped").to_string(index=False))
    for row in agreement.itertuples():
        print(f"{row.run}: swapped beyond {row.tie}: {row.swapped or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1:])
