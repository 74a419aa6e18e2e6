"""CPU timing of registration models: each configuration runs in a fresh process (so peak
memory is that configuration's own), a warm-up then the median of repeated forward passes."""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from .modelfile import load_model
from .networks import complexity


def time_calls(fn, repeats: int, warmup: int = 1) -> dict:
    """Median and minimum seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "seconds_min": min(times)}


def _measure(model_path, grid, threads, repeats, warmup) -> dict:
    torch.set_num_threads(threads)
    model, _, _ = load_model(model_path, "cpu")
    moving, fixed = torch.rand(1, 1, *grid), torch.rand(1, 1, *grid)
    with torch.inference_mode():
        result = time_calls(lambda: model(moving, fixed), repeats, warmup)
    # ru_maxrss is in KiB on Linux: the whole process (python, torch and the model included)
    return {**result, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def time_model(model_path, grid, threads: int = 1, repeats: int = 5, warmup: int = 1, timeout: float = 1800) -> dict:
    """Median CPU seconds per pair (random input on ``grid``), measured in a fresh interpreter
    (a subprocess, not multiprocessing: that would re-run a Snakemake script as __main__)."""
    args = json.dumps([str(model_path), list(grid), threads, repeats, warmup])
    proc = subprocess.run([sys.executable, "-m", "ldreg.timing", args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"timing of {model_path} at {grid} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_model_grid(model_path, grids, thread_counts, repeats=5, warmup=1) -> list[dict]:
    model, _, payload = load_model(model_path, "cpu")
    rows = []
    for grid in grids:
        info = complexity(model, grid)
        for threads in thread_counts:
            res = time_model(model_path, grid, threads, repeats, warmup)
            rows.append({"grid": "x".join(map(str, grid)), "threads": threads, "parameters": info["parameters"],
                         "gflops": info["flops"] / 1e9, "repeats": repeats, **res})
    return rows


if __name__ == "__main__":
    path, grid, threads, repeats, warmup = json.loads(sys.argv[1])
    print(json.dumps(_measure(path, tuple(grid), threads, repeats, warmup)))
