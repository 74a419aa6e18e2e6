"""CPU timing: every speed table times the register path the same way, each configuration in a
fresh process (so peak memory is that configuration's own), a warm-up then the median of the
repeats: :func:`ldreg.speed_profile.profile_one` for a network (its stages: preprocess, network,
warp, write) and :func:`ldreg.speed_profile.profile_ants` / ``profile_greedy`` for the peers.
``speed`` (rule time_cpu) reads the network stage on the model's grid from there, ``speed_profile``
every stage; the primitives (median of calls, peak memory, an isolated call) live here."""
from __future__ import annotations

import importlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def peak_rss_mb() -> float:
    """This process's peak resident memory (python, torch, model and buffers). VmHWM, not
    ``ru_maxrss``: Linux carries ``ru_maxrss`` over from the forking parent through exec, so a
    subprocess would report its parent's size whenever that was larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    # elsewhere (macOS: bytes; other systems: KiB) -- an upper bound, see above
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def run_isolated(target: str, timeout: float = 3600, **kwargs):
    """``module:function`` called with ``kwargs`` in a fresh interpreter, its JSON result
    returned: timings free of the caller's caches and threads, peak memory its own (a
    subprocess, not multiprocessing, which would re-run a Snakemake script as __main__)."""
    args = json.dumps({"target": target, "kwargs": kwargs})
    proc = subprocess.run([sys.executable, "-m", "ldreg.timing", args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{target}({kwargs}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_model(model_path, grid, threads: int = 1, repeats: int = 5, warmup: int = 1) -> dict:
    """Seconds of the network stage of ``register`` on a brain pair on ``grid`` (float32, as
    trained; median and best of ``repeats``) and the process's peak memory, isolated: the speed
    profile's measurement (:func:`ldreg.speed_profile.profile_one`)."""
    res = run_isolated("ldreg.speed_profile:profile_one", model_path=str(model_path), engine="float32",
                       grid=list(grid), threads=threads, repeats=repeats, warmup=warmup)
    return {"seconds": res["network_s"], "seconds_min": res["network_min_s"], "peak_rss_mb": res["peak_rss_mb"]}


def time_ants(grid, spacing: float, threads: int, repeats: int) -> dict:
    """Seconds of ANTs SyN's registration on the same brain pair on ``grid`` (median and best of
    ``repeats``; reading, reslicing and writing apart), isolated: the speed profile's measurement
    (:func:`ldreg.speed_profile.profile_ants`)."""
    res = run_isolated("ldreg.speed_profile:profile_ants", grid=list(grid), threads=threads, repeats=repeats,
                       warmup=0, spacing=spacing)
    return {"seconds": res["network_s"], "seconds_min": res["network_min_s"]}


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
    call = json.loads(sys.argv[1])
    module, function = call["target"].split(":")
    print(json.dumps(getattr(importlib.import_module(module), function)(**call["kwargs"])))
