"""Experiment (issue 16 item 4): the refinement rows of the accuracy table at another thread count.

    PYTHONPATH=workflow python experiments/refine_threads.py [THREADS] [RESULTS]

Scores student_unsupervised + 5 and + 10 refinement steps and 10 optimisation steps from zero on
the default run's 12 test pairs exactly as the `evaluate` rule does (ldreg.evaluate), at THREADS
threads (default 2; the workflow's evaluation jobs run on 1), and prints seconds a pair, Dice and
folding. Not part of `all`."""
import sys

import pandas as pd
import torch

from ldreg.evaluate import evaluate_pairs, refined_predictor
from ldreg.methods import parse_method
from ldreg.settings import RunSettings, load_config


def main(threads: int = 2, results: str = "results") -> None:
    torch.set_num_threads(threads)
    settings = RunSettings.from_config(load_config())
    subjects, pairs = pd.read_csv(f"{results}/data/subjects.csv"), pd.read_csv(f"{results}/data/pairs.csv")
    test = pairs[pairs.split == "test"]
    for method in ["student_unsupervised+refine5", "student_unsupervised+refine10", "optimise10"]:
        model = None if method.startswith("optimise") else f"{results}/models/student_unsupervised.pt"
        predict = refined_predictor(parse_method(method), model, settings.evaluation.refine.optimiser, "cpu")
        per_pair, _ = evaluate_pairs(method, predict, subjects, test, settings.spacing_mm, False)
        print(f"{method}: {threads} threads, {per_pair.predict_s.mean():.3f} s a pair (median "
              f"{per_pair.predict_s.median():.3f}), Dice {per_pair.dice.mean():.4f}, folding "
              f"{100 * per_pair.folding_fraction.mean():.4f} %", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2, sys.argv[2] if len(sys.argv) > 2 else "results")
