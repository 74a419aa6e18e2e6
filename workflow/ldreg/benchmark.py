"""Benchmarks of the registration core (figures written to a CSV, never asserted in tests):
Dice over 116 labels on a 128^3 pair on one thread, and student forward passes with FLOPs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .metrics import dice_per_label
from .networks import CascadeSpec, build_network, complexity
from .timing import time_calls


def core_benchmark(repeats: int = 5, grid=(128, 128, 128)) -> pd.DataFrame:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 117, grid).astype(np.int32)
    b = rng.integers(0, 117, grid).astype(np.int32)
    rows = [{"benchmark": "dice_116_labels", "grid": "x".join(map(str, grid)), "threads": 1,
             "seconds": time_calls(lambda: dice_per_label(a, b), repeats)["seconds"], "target_seconds": 1.0, "gflops": np.nan}]
    for cascades in (1, 3):
        model = build_network(CascadeSpec(kind="student", cascades=cascades, affine=True, affine_width=8)).eval()
        x, y = torch.rand(1, 1, *grid), torch.rand(1, 1, *grid)
        info = complexity(model, grid)
        with torch.inference_mode():
            seconds = time_calls(lambda: model(x, y), max(1, repeats // 2))["seconds"]
        rows.append({"benchmark": f"student_forward_{cascades}_cascade", "grid": "x".join(map(str, grid)), "threads": 1,
                     "seconds": seconds, "target_seconds": np.nan, "gflops": info["flops"] / 1e9,
                     "parameters": info["parameters"]})
    return pd.DataFrame(rows)
