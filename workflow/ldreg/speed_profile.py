"""Where the CPU time of registering one pair goes, per model and inference engine.

Every configuration (model x engine x grid x threads) runs the ``register`` path of
:mod:`ldreg.register` in a fresh interpreter (so its peak memory is its own) on a brain pair
(the embedded template and a rigidly moved copy, as NIfTI files) that lies on the model's grid,
and, for each ``native_inputs`` entry, on a pair of a scan's own shape and spacing (e.g.
154x188x154 at 1 mm), which the model's preprocessed grid receives and the outputs go back to:
stages preprocess (read, check, normalise, place on the grid), network, warp (field to the
fixed grid; image and labels warped), write (warped image, labels and field as .nii), median of
``repeats`` runs after ``warmup``. Writing .nii.gz is timed once on the side: gzip is
single-threaded and would otherwise hide everything else. The same run measures the machine's
own dense throughput (a large conv3d and matmul) so that achieved GFLOP/s read as a fraction of
what this CPU can do, and re-evaluates each model and engine on the test pairs (the accuracy guard).
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from .allocator import keep_freed_memory
from .engines import cpu_summary, engine_spec, native_engines, precision_native, skip_reason
from .evaluate import evaluate_pairs, flow_predictor, registration_flag, summary
from .networks import complexity
from .methods import ANTS, greedy_method
from .peers import ANTS_AVAILABLE, GREEDY_AVAILABLE, ants_missing_note, greedy_missing_note
from .register import Registrar, write_outputs
from .timing import peak_rss_mb, run_isolated, time_calls

log = logging.getLogger(__name__)

STAGES = ("preprocess", "network", "warp", "write")
DICE_TOLERANCE = 0.005  # the largest mean-Dice loss a speed change may cost without a flag


def machine_throughput(threads: int, repeats: int = 3, channels: int = 64, size: int = 64,
                       matmul: int = 2048) -> list[dict]:
    """GFLOP/s of large dense operations on this CPU with ``threads`` threads: a 3x3x3 conv3d
    of ``channels`` -> ``channels`` on a ``size``^3 grid (float32 in both layouts; bfloat16
    channels-last) and a ``matmul``^2 matmul (float32, bfloat16). A precision this CPU would
    emulate is not run: its rows carry the reason in ``note``."""
    torch.set_num_threads(threads)
    rows = []
    x = torch.randn(1, channels, size, size, size)
    conv_flops = 2 * 27 * channels * channels * size**3
    conv_op, matmul_op = f"conv3d_{channels}ch_{size}^3", f"matmul_{matmul}"
    with torch.inference_mode():
        for dtype, channels_last in (("float32", False), ("float32", True), ("bfloat16", True)):
            row = {"op": conv_op, "dtype": dtype, "channels_last": channels_last, "threads": threads}
            if not precision_native(dtype):
                rows.append({**row, "gflops_per_s": np.nan, "note": skip_reason(dtype)})
                continue
            fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
            conv = torch.nn.Conv3d(channels, channels, 3, padding=1).eval().to(getattr(torch, dtype), memory_format=fmt)
            inp = x.to(getattr(torch, dtype), memory_format=fmt)
            seconds = time_calls(lambda c=conv, i=inp: c(i), repeats)["seconds"]
            rows.append({**row, "gflops_per_s": conv_flops / seconds / 1e9, "note": ""})
        a = torch.randn(matmul, matmul)
        for dtype in ("float32", "bfloat16"):
            row = {"op": matmul_op, "dtype": dtype, "channels_last": False, "threads": threads}
            if not precision_native(dtype):
                rows.append({**row, "gflops_per_s": np.nan, "note": skip_reason(dtype)})
                continue
            m = a.to(getattr(torch, dtype))
            seconds = time_calls(lambda m=m: m @ m, repeats)["seconds"]
            rows.append({**row, "gflops_per_s": 2 * matmul**3 / seconds / 1e9, "note": ""})
    return rows


def _profile_inputs(folder: Path, shape, spacing: float, seed: int) -> dict:
    """A brain pair of ``shape`` at ``spacing`` mm: the embedded MNI152 template (fixed) and the
    template moved rigidly by a few degrees and millimetres (moving, with its Desikan-Killiany
    labels). A brain, not noise: an iterative method such as ANTs SyN runs until it converges,
    and on noise it has nothing to converge on (it failed outright on smoothed noise)."""
    from .data import SyntheticConfig, embedded_atlas_paths, random_affine
    from .preprocessing import resample_to_grid

    image_path, labels_path = embedded_atlas_paths()
    atlas, atlas_labels = nib.load(image_path), nib.load(labels_path)
    corners = np.array(atlas.shape) - 1
    centre = nib.affines.apply_affine(atlas.affine, corners / 2)
    target = np.diag([spacing] * 3 + [1.0])
    target[:3, 3] = centre - spacing * (np.array(shape) - 1) / 2
    # a rigid motion about the grid's centre (the brain's), in the target grid's voxels
    motion = target @ random_affine(shape, SyntheticConfig(spacing_mm=spacing, rotation_deg=3.0, translation_mm=3.0,
                                                            scaling=0.0), np.random.default_rng(seed))
    image = np.asarray(atlas.dataobj, dtype=np.float32)
    paths = {"moving": folder / "moving.nii", "fixed": folder / "fixed.nii", "labels": folder / "moving_labels.nii"}
    nib.save(nib.Nifti1Image(resample_to_grid(image, atlas.affine, shape, target), target), paths["fixed"])
    nib.save(nib.Nifti1Image(resample_to_grid(image, atlas.affine, shape, motion), target), paths["moving"])
    labels = resample_to_grid(np.asarray(atlas_labels.dataobj).astype(np.int16), atlas_labels.affine, shape, motion,
                              order=0)
    nib.save(nib.Nifti1Image(labels, target), paths["labels"])
    return paths


def process_start_up(model_path: str, threads: int, repeats: int = 3) -> list[dict]:
    """The fixed cost of a ``register`` process, each step in a fresh interpreter (median of
    ``repeats``, wall seconds, interpreter start included): Python alone, ``register --help``,
    torch's import, register's imports, and those plus loading ``model_path``."""
    import os
    import subprocess
    import sys

    steps = {"python alone": "pass",
             "register --help": "from ldreg.cli import register_main\ntry: register_main(['--help'])\nexcept SystemExit: pass",
             "import torch": "import torch",
             "register's imports": "import ldreg.register",
             "register's imports + load model": f"from ldreg.register import Registrar; Registrar({str(model_path)!r})"}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    rows = []
    for step, code in steps.items():
        seconds = []
        for _ in range(repeats + 1):  # the first run warms the file cache
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
            seconds.append(time.perf_counter() - t)
        rows.append({"op": f"start-up: {step}", "threads": threads, "seconds": statistics.median(seconds[1:])})
    return rows


def _stage_summary(runs: list[dict]) -> dict:
    """Median and best of each stage and of the total over ``runs``, and this process's peak memory."""
    totals = [sum(r[s] for s in STAGES) for r in runs]
    return {**{f"{s}_s": statistics.median(r[s] for r in runs) for s in STAGES},
            **{f"{s}_min_s": min(r[s] for r in runs) for s in STAGES},
            "total_s": statistics.median(totals), "total_min_s": min(totals), "peak_rss_mb": peak_rss_mb()}


def profile_one(model_path: str, engine: str, grid, threads: int, repeats: int, warmup: int, seed: int = 0,
                native: dict | None = None) -> dict:
    """One configuration's stage times (medians), peak memory and FLOPs; run it isolated.
    ``native`` ({shape, spacing_mm}): inputs of that shape and spacing instead of the grid's."""
    keep_freed_memory()  # as register does
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    precision, channels_last = engine_spec(engine)
    grid = tuple(grid)
    registrar = Registrar(model_path, "cpu", precision, channels_last, grid=grid)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shape, spacing = (grid, registrar.prep.spacing_mm) if native is None else (native["shape"], native["spacing_mm"])
        paths = _profile_inputs(tmp, tuple(shape), spacing, seed)
        outputs = {"warped_path": tmp / "warped.nii", "field_path": tmp / "field.nii",
                   "warped_labels_path": tmp / "warped_labels.nii"}
        runs = []
        for i in range(warmup + repeats):
            result = registrar.register(paths["moving"], paths["fixed"], paths["labels"])
            t = time.perf_counter()
            write_outputs(result, **outputs)
            times = {**result["times"], "write": time.perf_counter() - t}
            if i >= warmup:
                runs.append(times)
        t = time.perf_counter()
        write_outputs(result, **{k: v.with_suffix(".nii.gz") for k, v in outputs.items()})
        write_gz = time.perf_counter() - t
    return {**_stage_summary(runs), "write_nii_gz_s": write_gz}


def profile_ants(grid, threads: int, repeats: int, warmup: int, seed: int = 0, native: dict | None = None,
                 spacing: float = 1.0) -> dict:
    """ANTs SyN end to end on the same inputs as :func:`profile_one` (stages as there, see
    :func:`ldreg.peers.ants_register_files`); run it isolated (ITK reads its thread count once)."""
    from .peers import ants_register_files

    shape, spacing = (tuple(grid), spacing) if native is None else (tuple(native["shape"]), native["spacing_mm"])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _profile_inputs(Path(tmp), shape, spacing, seed)
        for i in range(warmup + repeats):
            times = ants_register_files(paths["moving"], paths["fixed"], paths["labels"], tmp, threads).times
            if i >= warmup:
                runs.append(times)
    return _stage_summary(runs)


def profile_greedy(grid, threads: int, repeats: int, warmup: int, seed: int = 0, native: dict | None = None,
                   spacing: float = 1.0, setting: dict | None = None) -> dict:
    """Greedy end to end on the same inputs as :func:`profile_one` (register, then reslice the
    image and labels and write them; :func:`ldreg.peers.greedy_register_files`)."""
    from .peers import GreedySetting, greedy_register_files

    shape, spacing = (tuple(grid), spacing) if native is None else (tuple(native["shape"]), native["spacing_mm"])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _profile_inputs(Path(tmp), shape, spacing, seed)
        for i in range(warmup + repeats):
            times = greedy_register_files(paths["moving"], paths["fixed"], paths["labels"], tmp, threads,
                                          GreedySetting(**(setting or {}))).times
            if i >= warmup:
                runs.append(times)
    return _stage_summary(runs)


def count_flops(model_path: str, grid) -> dict:
    """FLOPs of one forward pass (in its own process: counting runs float32 and would
    otherwise set the profiled process's peak memory)."""
    from .modelfile import load_model

    return complexity(load_model(model_path)[0], tuple(grid))


def engine_scores(model_path, engine: str, subjects: pd.DataFrame, test_pairs: pd.DataFrame, spacing: float) -> dict:
    """Mean Dice and folding over the test pairs with the model run by ``engine`` (no HD95:
    Dice is the guard); ``model_path`` None scores no registration."""
    if model_path is None:
        name, predict = "identity", flow_predictor("identity")
    else:
        precision, channels_last = engine_spec(engine)
        registrar = Registrar(model_path, "cpu", precision, channels_last)
        name, predict = f"{Path(model_path).stem}:{engine}", lambda m, f: registrar.model(m, f, warp=False)["flow"].float()
    per_pair, _ = evaluate_pairs(name, predict, subjects, test_pairs, spacing, False)
    return {"dice": float("nan"), **summary(per_pair)}


ON_GRID = "on the model grid"


def input_label(native: dict | None) -> str:
    """The profile table's ``input`` column: where the pair's images lie."""
    if native is None:
        return ON_GRID
    return f"{'x'.join(map(str, native['shape']))} at {native['spacing_mm']:g} mm"


def plan(models, engines, grids, thread_counts, native_inputs=()) -> tuple[list[tuple], list[dict]]:
    """The configurations to profile (model, engine, grid, threads, native input or None):
    every grid with inputs on it, then each native input on the first (the model's own) grid;
    engines this CPU would emulate left out, and one note row per model and skipped engine."""
    kept, skipped = native_engines(engines)
    inputs = [(tuple(g), None) for g in grids] + [(tuple(grids[0]), dict(n)) for n in native_inputs]
    configs = [(m, e, g, n, x) for m in models for e in kept for g, x in inputs for n in thread_counts]
    notes = [{"model": m, "engine": e, "accuracy_note": why} for m in models for e, why in skipped.items()]
    return configs, notes


def speed_profile(models: dict, engines, grids, thread_counts, repeats: int, warmup: int, subjects: pd.DataFrame,
                  test_pairs: pd.DataFrame, spacing: float, reference: str, baseline_model: str,
                  reference_model: str | None = None, seed: int = 0,
                  native_inputs=(), ants_repeats: int = 0, greedy_settings: dict | None = None,
                  greedy_repeats: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The profile table and the machine-throughput table.

    ``reference`` is the engine every other engine's Dice is compared with (same model);
    ``baseline_model`` is the model every speed-up refers to (the teacher, in the reference
    engine, same grid and threads); ``reference_model`` (in the reference engine) is what a
    faster architecture's Dice is compared with (the full-resolution student). Engines this
    CPU would emulate are not run (:mod:`ldreg.engines`): they appear as note rows.
    ``native_inputs`` ({shape, spacing_mm} each) add rows for scans at their own resolution.
    ``ants_repeats`` > 0: ANTs SyN is timed as many times on every input and thread count
    (rows ``peer_ants_syn``; each row's ``speedup_vs_ants_syn`` refers to it); ``greedy_repeats``
    > 0: each of ``greedy_settings`` (name -> :class:`ldreg.peers.GreedySetting`) likewise (rows
    ``peer_greedy_<name>``)."""
    configs, skipped_rows = plan(models, engines, grids, thread_counts, native_inputs)
    if not precision_native(engine_spec(reference)[0]):
        log.warning("reference engine %s %s; float32 is the reference instead", reference, skip_reason(engine_spec(reference)[0]))
        reference = "float32"
    ran = list(dict.fromkeys(e for _, e, _, _, _ in configs))
    if reference not in ran:
        ran.insert(0, reference)
    cpu = cpu_summary()
    machine = _machine_table(str(models[reference_model or next(iter(models))]), thread_counts, cpu)
    scores = {(m, e): engine_scores(p, e, subjects, test_pairs, spacing) for m, p in models.items() for e in ran}
    dice = {k: v["dice"] for k, v in scores.items()}
    identity = engine_scores(None, reference, subjects, test_pairs, spacing)["dice"]
    unguarded = ""
    if reference_model:
        ref = scores[(reference_model, reference)]
        flag = registration_flag(ref["dice"], identity, ref["folding_percent"])
        if flag:  # a model that does not register guards nothing
            log.warning("reference model %s does not register (%s): no accuracy guard against it", reference_model, flag)
            unguarded = f"reference model {reference_model} does not register ({flag}): no guard against it"
            reference_model = None
    flops = {(m, tuple(g)): run_isolated("ldreg.speed_profile:count_flops", model_path=str(p), grid=list(g))["flops"]
             for m, p in models.items() for g in dict.fromkeys(c[2] for c in configs)}
    rows = _network_rows(models, configs, machine, flops, dice, reference, repeats, warmup, seed)
    inputs = {(grid, threads, input_label(native)): native for _, _, grid, threads, native in configs}
    peers = ([(ANTS, "ants", "profile_ants", {}, ants_repeats, ANTS_AVAILABLE, ants_missing_note())] if ants_repeats else [])
    peers += [(greedy_method(name), "greedy", "profile_greedy", {"setting": asdict(setting)}, greedy_repeats, GREEDY_AVAILABLE,
               greedy_missing_note()) for name, setting in (greedy_settings or {}).items() if greedy_repeats]
    rows += _peer_rows(peers, inputs, spacing, seed, skipped_rows)
    table = _compared(pd.DataFrame(rows), baseline_model, reference, reference_model, dice, unguarded)
    table["identity_dice"] = identity
    table = pd.concat([table, pd.DataFrame(skipped_rows)], ignore_index=True)
    table.insert(1, "cpu", cpu)
    order = ["model", "cpu", "engine", "grid", "input", "threads", "total_s", "total_min_s", *[f"{s}_s" for s in STAGES],
             "write_nii_gz_s", "peak_rss_mb", "gflops", "achieved_gflops_per_s", "machine_conv3d_gflops_per_s",
             "fraction_of_machine", "speedup_vs_baseline", "network_speedup_vs_baseline", "speedup_vs_ants_syn", "dice",
             "identity_dice", "dice_change_vs_reference", *(["dice_change_vs_reference_model"] if reference_model else []),
             "accuracy_note", "repeats", "warmup", "seed"]
    return table.reindex(columns=order), machine


def _machine_table(model_path: str, thread_counts, cpu: str) -> pd.DataFrame:
    """The machine's convolution and memory throughput per thread count, and a registration
    process's start-up (imports, model load)."""
    machine = pd.DataFrame([r for n in thread_counts for r in run_isolated(
        "ldreg.speed_profile:machine_throughput", threads=n)])
    start_up = process_start_up(model_path, max(thread_counts))
    machine = pd.concat([machine, pd.DataFrame(start_up)], ignore_index=True)
    machine.insert(0, "cpu", cpu)
    machine["torch"] = torch.__version__
    return machine


def _network_rows(models: dict, configs, machine: pd.DataFrame, flops: dict, dice: dict, reference: str,
                  repeats: int, warmup: int, seed: int) -> list[dict]:
    """One row per (model, engine, grid, threads, input), each profiled in a process of its own."""
    rows = []
    for k, (name, engine, grid, threads, native) in enumerate(configs, 1):
        t = time.perf_counter()
        res = run_isolated("ldreg.speed_profile:profile_one", model_path=str(models[name]), engine=engine,
                           grid=list(grid), threads=threads, repeats=repeats, warmup=warmup, seed=seed, native=native)
        log.info("[%d/%d] %s %s %s, inputs %s, %d thread(s): %.3f s a pair (profiled in %.0f s)", k, len(configs), name,
                 engine, "x".join(map(str, grid)), input_label(native), threads, res["total_s"], time.perf_counter() - t)
        precision = engine_spec(engine)[0]
        best = machine[machine.op.str.startswith("conv3d") & (machine.dtype == precision) & (machine.threads == threads)]
        gflops = flops[(name, grid)] / 1e9
        rows.append({"model": name, "engine": engine, "grid": "x".join(map(str, grid)), "input": input_label(native),
                     "threads": threads, **res,
                     "gflops": gflops, "achieved_gflops_per_s": gflops / res["network_s"],
                     "machine_conv3d_gflops_per_s": best.gflops_per_s.max(),
                     "dice": dice[(name, engine)], "dice_change_vs_reference": dice[(name, engine)] - dice[(name, reference)],
                     "repeats": repeats, "warmup": warmup, "seed": seed})
    return rows


def _peer_rows(peers, inputs: dict, spacing: float, seed: int, skipped_rows: list) -> list[dict]:
    """ANTs SyN and Greedy, end to end on the same inputs and threads; a peer that is not
    installed gets a note row in ``skipped_rows`` instead."""
    rows = []
    for peer, engine, profiler, options, peer_repeats, available, missing in peers:
        if not available:
            log.warning("%s not timed: %s", peer, missing)
            skipped_rows.append({"model": peer, "accuracy_note": missing})
            continue
        for (grid, threads, _), native in inputs.items():
            t = time.perf_counter()
            res = run_isolated(f"ldreg.speed_profile:{profiler}", grid=list(grid), threads=threads, repeats=peer_repeats,
                               warmup=0, seed=seed, native=native, spacing=spacing, **options)
            log.info("%s, inputs %s, %d thread(s): %.2f s a pair (profiled in %.0f s)", peer, input_label(native),
                     threads, res["total_s"], time.perf_counter() - t)
            rows.append({"model": peer, "engine": engine, "grid": "x".join(map(str, grid)), "input": input_label(native),
                         "threads": threads, **res, "repeats": peer_repeats, "warmup": 0, "seed": seed})
    return rows


def _compared(table: pd.DataFrame, baseline_model: str, reference: str, reference_model: str | None, dice: dict,
              unguarded: str) -> pd.DataFrame:
    """Each row against the machine, the baseline model, ANTs SyN and the reference engine and
    model (speed-ups, Dice changes, and a note where Dice is lost beyond the tolerance)."""
    table["fraction_of_machine"] = table.achieved_gflops_per_s / table.machine_conv3d_gflops_per_s
    base = table[(table.model == baseline_model) & (table.engine == reference)].set_index(["grid", "input", "threads"])
    key = list(zip(table.grid, table.input, table.threads))
    table["speedup_vs_baseline"] = [base.total_s.get(k, np.nan) for k in key] / table.total_s
    table["network_speedup_vs_baseline"] = [base.network_s.get(k, np.nan) for k in key] / table.network_s
    ants = table[table.model == ANTS].set_index(["grid", "input", "threads"])
    table["speedup_vs_ants_syn"] = [ants.total_s.get(k, np.nan) for k in key] / table.total_s
    notes = np.where(table.dice_change_vs_reference < -DICE_TOLERANCE,
                     f"loses more than {DICE_TOLERANCE} Dice against {reference}", "")
    if reference_model:
        table["dice_change_vs_reference_model"] = table.dice - dice[(reference_model, reference)]
        worse = (table.dice_change_vs_reference_model < -DICE_TOLERANCE) & (table.model != baseline_model)
        notes = [("; " if n else "").join(filter(None, [n, f"loses more than {DICE_TOLERANCE} Dice against "
                                                         f"{reference_model} {reference}" if w else ""]))
                 for n, w in zip(notes, worse)]
    table["accuracy_note"] = ["; ".join(filter(None, [n, unguarded])) for n in notes]
    return table
