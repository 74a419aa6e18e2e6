"""Accuracy where users register: at the scan's own resolution, through the path ``register``
takes, every method timed end to end on the same files and threads.

Each method turns a pair of NIfTI files (moving with its label map, fixed) into the moving label
map on the fixed image's own grid and a displacement field there: the networks and their
refinement through :class:`ldreg.register.Registrar` (read, preprocess onto the model's grid,
network, refinement, field mapped back to the native grid, image and labels warped, outputs
written as .nii), ANTs SyN and Greedy as their users run them (read, register, reslice image
and labels, write). The seconds are that whole path in one process, model loading and imports
excepted (``register`` pays those once per process). Dice, HD95 (at the fixed image's spacing),
folding and SDlogJ are computed on the native grid afterwards, outside the timed part.
"""
from __future__ import annotations

import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from .preprocessing import resample_to_grid
from .evaluate import registration_flag
from .io import InputError, itk_array_to_field, load_volume
from .methods import Method
from .metrics import dice_per_label, hd95, jacobian_summary
from .defaults import REFINE_SPACINGS
from .optimise import refine_schedule
from .progress import progress

log = logging.getLogger(__name__)


@dataclass
class NativeOutput:
    warped_labels: np.ndarray  # the moving label map on the fixed image's grid
    field: np.ndarray  # (3, D, H, W) in the fixed image's voxels
    times: dict  # stage -> seconds


def _identity(moving, fixed, moving_labels, out_dir) -> NativeOutput:
    """No registration: the moving labels placed on the fixed grid by their world coordinates."""
    labels, labels_img = load_volume(moving_labels, "labels")
    fixed_img = nib.load(str(fixed))
    shape = fixed_img.shape[:3]
    placed = resample_to_grid(labels, labels_img.affine, shape, fixed_img.affine, order=0)
    return NativeOutput(placed.astype(np.int32), np.zeros((3, *shape), np.float32), {})


def _network_runner(method: Method, model_path, spacings, device: str):
    from .register import Registrar, write_outputs

    spacings = method.spacings or spacings
    levels = refine_schedule(method.steps, spacings) if method.kind == "refine" else ()
    registrar = Registrar(model_path, device, refine_levels=levels, upto=0 if method.kind == "affine" else None)

    def run(moving, fixed, moving_labels, out_dir) -> NativeOutput:
        result = registrar.register(moving, fixed, moving_labels)
        t = time.perf_counter()
        write_outputs(result, Path(out_dir) / "warped.nii", Path(out_dir) / "field.nii", Path(out_dir) / "warped_labels.nii")
        times = {**result["times"], "write": time.perf_counter() - t}
        return NativeOutput(np.asarray(result["warped_labels"]), np.asarray(result["field"]), times)

    return run


def _peer_runner(method: Method, threads: int, greedy_settings: dict):
    from . import peers

    if method.kind == "ants":
        if not peers.ANTS_AVAILABLE:
            raise InputError(peers.ants_missing_note())
        register = lambda m, f, ml, out: peers.ants_register_files(m, f, ml, out, threads)
    else:
        if not peers.GREEDY_AVAILABLE:
            raise InputError(peers.greedy_missing_note())
        setting = peers.greedy_setting(greedy_settings, method.setting)
        register = lambda m, f, ml, out: peers.greedy_register_files(m, f, ml, out, threads, setting)

    def run(moving, fixed, moving_labels, out_dir) -> NativeOutput:
        done = register(moving, fixed, moving_labels, out_dir)
        warp = nib.load(str(done.warp_file))
        labels = np.asarray(nib.load(str(done.warped_labels)).dataobj).astype(np.int32)
        return NativeOutput(labels, itk_array_to_field(np.asarray(warp.dataobj), warp.affine), done.times)

    return run


def native_runner(method: Method, model_path=None, spacings=REFINE_SPACINGS, greedy_settings: dict | None = None,
                  threads: int = 1, device: str = "cpu"):
    """A function (moving, fixed, moving_labels, out_dir) -> :class:`NativeOutput` for ``method``;
    ``spacings``: the refinement's levels (mm) where the method's name does not set its own;
    ``greedy_settings``: name -> :class:`ldreg.peers.GreedySetting`."""
    if method.kind == "identity":
        return _identity
    if method.peer:
        return _peer_runner(method, threads, greedy_settings or {})
    if method.kind == "optimise":
        raise ValueError(f"{method.name}: optimisation from a zero field has no native-resolution path "
                         "(register always starts from a network)")
    return _network_runner(method, model_path, spacings, device)


def cohort_native_pairs(raw_subjects: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The test pairs as files at the subjects' own resolution (before preprocessing)."""
    raw = raw_subjects.set_index("id")
    if "labels" not in raw or raw["labels"].isna().any() or not (raw["labels"].astype(str) != "").all():
        raise InputError("native-resolution evaluation needs a label map for every subject (the manifest's 'labels')")
    test = pairs[pairs.split == "test"]
    return pd.DataFrame({"pair_id": test.pair_id.values, "moving": raw.loc[test.moving, "image"].values,
                         "moving_labels": raw.loc[test.moving, "labels"].values,
                         "fixed": raw.loc[test.fixed, "image"].values,
                         "fixed_labels": raw.loc[test.fixed, "labels"].values})


def evaluate_native(name: str, run, pairs: pd.DataFrame, with_hd95: bool = True,
                    show_progress: bool = True, scoring_workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-pair metrics (Dice, HD95, folding, SDlogJ, seconds end to end and per stage) and
    per-structure Dice for one method on ``pairs`` (moving, moving_labels, fixed, fixed_labels).

    Every pair is registered first, one at a time on all the threads (the seconds are a claim),
    then scored, ``scoring_workers`` pairs at a time (default: torch's threads): scoring is not
    timed, and numpy and scipy release the GIL for most of it."""
    outputs = []
    for row in progress(list(pairs.itertuples()), desc=f"native {name}", logger=__name__, disable=not show_progress):
        with tempfile.TemporaryDirectory() as tmp:
            outputs.append((row, run(row.moving, row.fixed, row.moving_labels, tmp)))
    threads = torch.get_num_threads()
    with ThreadPoolExecutor(max(1, scoring_workers or threads)) as pool:
        scored = list(pool.map(lambda done: _score_pair(name, *done, with_hd95, threads), outputs))
    per_pair = [rec for rec, _ in scored]
    per_label = [rec for _, labels in scored for rec in labels]
    return pd.DataFrame(per_pair), pd.DataFrame(per_label)


def _score_pair(name: str, row, out: NativeOutput, with_hd95: bool, threads: int) -> tuple[dict, list[dict]]:
    """One registered pair's metrics on the fixed image's grid: (per-pair record, per-structure Dice)."""
    # the method's own stages (read to write): reading a peer's outputs back for scoring is not its time
    seconds = sum(out.times.values())
    fixed_labels, fixed_img = load_volume(row.fixed_labels, "labels")
    moving_labels, _ = load_volume(row.moving_labels, "labels")
    if out.warped_labels.shape != fixed_labels.shape:
        raise InputError(f"{name}: warped labels {out.warped_labels.shape} are not on the grid of "
                         f"{row.fixed_labels} {fixed_labels.shape}")
    labels = np.intersect1d(np.unique(fixed_labels), np.unique(moving_labels))
    dice = dice_per_label(out.warped_labels, fixed_labels, labels)
    spacing = tuple(float(z) for z in fixed_img.header.get_zooms()[:3])
    rec = {"method": name, "pair_id": row.pair_id, "seconds": seconds if out.times else np.nan,
           "threads": threads, "shape": "x".join(map(str, fixed_labels.shape)),
           "spacing_mm": spacing[0], "dice": float(np.nanmean(list(dice.values()))),
           "labels_lost": int(sum(v == 0 for v in dice.values())),
           **jacobian_summary(out.field),
           **{f"{stage}_s": s for stage, s in out.times.items()}}
    if with_hd95:
        rec["hd95_mm"] = float(np.nanmean(list(hd95(out.warped_labels, fixed_labels, spacing, labels).values())))
    return rec, [{"method": name, "pair_id": row.pair_id, "label": k, "dice": v} for k, v in dice.items()]


def native_accuracy_table(evals: pd.DataFrame) -> pd.DataFrame:
    """One row per method: pairs scored, Dice mean ± sd, its gain over no registration on the
    same pairs (a slow peer may score fewer), HD95, folding, SDlogJ, median seconds a pair end
    to end and per stage, and a flag where a method does not register."""
    if "note" in evals:
        notes = evals.dropna(subset=["note"])
        evals = evals[evals["note"].isna()] if len(notes) else evals
    else:
        notes = evals.iloc[0:0]
    identity = evals[evals.method == "identity"].set_index("pair_id")["dice"]
    stages = [c for c in evals.columns if c.endswith("_s") and c != "seconds"]
    rows = []
    for method, g in evals.groupby("method", sort=False):
        same = identity.reindex(g.pair_id)
        row = {"method": method, "pairs": len(g), "shape": g["shape"].iloc[0], "spacing_mm": g.spacing_mm.iloc[0],
               "dice": f"{g.dice.mean():.3f} ± {g.dice.std(ddof=0):.3f}", "dice_mean": g.dice.mean(),
               "dice_gain": float((g.dice.values - same.values).mean()) if same.notna().all() else np.nan,
               "hd95_mm": g["hd95_mm"].mean() if "hd95_mm" in g else np.nan,
               "folding_percent": 100 * g.folding_fraction.mean(), "sdlogj": g.sdlogj.mean(),
               "seconds": g.seconds.median(), "threads": int(g.threads.iloc[0]),
               **{s: g[s].median() for s in stages if g[s].notna().any()}}
        identity_here = float(same.mean()) if same.notna().all() else np.nan
        row["flag"] = "" if method == "identity" else registration_flag(row["dice_mean"], identity_here,
                                                                         row["folding_percent"])
        rows.append(row)
    table = pd.DataFrame(rows)
    for row in notes.itertuples():  # a peer that was skipped, and why
        table = pd.concat([table, pd.DataFrame([{"method": row.method, "flag": row.note}])], ignore_index=True)
    return table


def pareto_front(seconds, dice) -> np.ndarray:
    """Indices of the points no other point beats in both time (lower) and Dice (higher),
    ordered by time."""
    seconds, dice = np.asarray(seconds, float), np.asarray(dice, float)
    order = np.lexsort((-dice, seconds))
    front, best = [], -np.inf
    for i in order:
        if dice[i] > best:
            front.append(i)
            best = dice[i]
    return np.array(front, dtype=int)
