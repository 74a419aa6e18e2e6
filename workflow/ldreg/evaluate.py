"""Accuracy of a model (or a reference: no registration, the teacher's affine stage) on the
test pairs: Dice, HD95, folding, SDlogJ, and error against the true field where it is known."""
from __future__ import annotations

import logging
import time

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from .data import true_pair_field
from .guard import FOLDING_BOUND_PERCENT
from .io import InputError
from .methods import Method
from .metrics import dice_per_label, field_error, hd95, jacobian_summary
from .modelfile import load_model
from .optimise import optimise_field, refine_on_grid
from .progress import progress
from .warp import warp_labels

log = logging.getLogger(__name__)


def flow_predictor(method: str, model_path=None, device: str = "cpu"):
    """A function (moving, fixed) -> field (1, 3, D, H, W) for a method: 'identity' (no
    registration), 'affine' (the model's affine stage alone) or 'model'."""
    if method == "identity":
        return lambda m, f: torch.zeros(1, 3, *m.shape[2:])
    model, _, _ = load_model(model_path, device)
    if method == "affine":
        if model.affine is None:
            raise ValueError(f"{model_path}: has no affine stage to evaluate")
        return lambda m, f: model(m.to(device), f.to(device), upto=0, warp=False)["flow"].cpu()
    if method == "model":
        return lambda m, f: model(m.to(device), f.to(device), warp=False)["flow"].cpu()
    raise ValueError(f"unknown method {method!r}")


def refined_predictor(method: Method, model_path, optimiser: dict | None = None, device: str = "cpu"):
    """'optimise<K>': K Adam steps of per-pair optimisation from a zero field
    (:func:`ldreg.optimise.optimise_field`); '<model>+refine<K>': the model's field refined by K
    iterations of register's refinement on the model's grid (the images the table scores;
    :func:`ldreg.optimise.refine_on_grid`). ``optimiser``: keyword arguments of
    :func:`ldreg.optimise.optimise_field` (``evaluation.refine``'s, :class:`ldreg.settings.RefineSettings`)."""
    steps = method.steps
    if method.spacings or isinstance(steps, tuple):
        raise ValueError(f"{method.name}: refinement levels (in mm, or each level's iterations) exist at the scan's "
                         "own resolution only (native_evaluation), not on the model's grid")
    if method.kind == "optimise":
        opts = dict(optimiser or {})
        return lambda m, f: optimise_field(m, f, None, steps, **opts)[0]
    start = flow_predictor("model", model_path, device)
    return lambda m, f: refine_on_grid(m, f, start(m, f), steps)


def _load(path, dtype):
    img = nib.load(path)
    return np.asarray(img.dataobj).astype(dtype), img


@torch.inference_mode()
def evaluate_pairs(name: str, predict, subjects: pd.DataFrame, pairs: pd.DataFrame, spacing: float,
                   with_hd95: bool = True, show_progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-pair metrics and per-structure Dice (long format) for one method."""
    subj = subjects.set_index("id")
    has_truth = "true_forward" in subj.columns
    per_pair, per_label = [], []
    for row in progress(list(pairs.itertuples()), desc=f"evaluate {name}", logger=__name__,
                        disable=not show_progress):
        mov, fix = subj.loc[row.moving], subj.loc[row.fixed]
        moving, mov_img = _load(mov.image, np.float32)
        fixed, fix_img = _load(fix.image, np.float32)
        t = time.perf_counter()
        flow = predict(torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None])
        seconds = time.perf_counter() - t
        field = flow[0].numpy()
        rec = {"method": name, "pair_id": row.pair_id, "predict_s": seconds, "threads": torch.get_num_threads(),
               **jacobian_summary(field)}
        fix_lab = None
        if isinstance(mov.labels, str) and mov.labels:
            mov_lab, _ = _load(mov.labels, np.int32)
            fix_lab, _ = _load(fix.labels, np.int32)
            for path, lab in ((mov.labels, mov_lab), (fix.labels, fix_lab)):
                if lab.min() < 0:
                    raise InputError(f"{path}: label map has negative values (min {lab.min()}); labels must be >= 0")
            warped = warp_labels(torch.from_numpy(mov_lab)[None, None], flow)[0, 0].numpy()
            labels = np.intersect1d(np.unique(fix_lab), np.unique(mov_lab))
            dice = dice_per_label(warped, fix_lab, labels)
            rec["dice"] = float(np.nanmean(list(dice.values())))
            # structures of both maps that the warp lost (scored Dice 0, no HD95)
            rec["labels_lost"] = int(sum(v == 0 for v in dice.values()))
            if with_hd95:
                rec["hd95_mm"] = float(np.nanmean(list(hd95(warped, fix_lab, (spacing,) * 3, labels).values())))
            per_label += [{"method": name, "pair_id": row.pair_id, "label": k, "dice": v} for k, v in dice.items()]
        if has_truth and isinstance(mov.get("true_inverse"), str):
            truth = true_pair_field(fix_img.affine, fixed.shape, mov_img.affine,
                                    nib.load(fix.true_forward), nib.load(mov.true_inverse))
            rec.update(field_error(field, truth, (spacing,) * 3, None if fix_lab is None else fix_lab > 0))
        per_pair.append(rec)
    return pd.DataFrame(per_pair), pd.DataFrame(per_label)


def summary(per_pair: pd.DataFrame) -> dict:
    """Mean Dice, end-point error (where the truth is known) and folding (% of voxels)."""
    out = {"folding_percent": 100 * float(per_pair.folding_fraction.mean())}
    if "dice" in per_pair:
        out["dice"] = float(per_pair.dice.mean())
    if "epe_mean_mm" in per_pair:
        out["epe_mm"] = float(per_pair.epe_mean_mm.mean())
    return out


def validator(subjects: pd.DataFrame, pairs: pd.DataFrame, spacing: float, device: str = "cpu"):
    """``validate(model) -> summary`` on held-out pairs, for learning curves and the divergence
    guard; ``validate(None)`` scores no registration on the same pairs."""
    if pairs.empty:
        raise InputError("no validation pairs: set splits.val > 0 (or training.validation_pairs: 0 to switch off)")

    def validate(model) -> dict:
        if model is None:
            predict = flow_predictor("identity")
        else:
            predict = lambda m, f: model(m.to(device), f.to(device), warp=False)["flow"].float().cpu()
        per_pair, _ = evaluate_pairs("validation", predict, subjects, pairs, spacing, with_hd95=False, show_progress=False)
        return summary(per_pair)

    return validate


# a Dice gain over no registration smaller than this counts as none (a student whose kept state
# was essentially the zero field scored identity + 0.0000 on the default run, unflagged)
NO_GAIN_DICE = 0.005


def registration_flag(dice: float, identity_dice: float, folding_percent: float) -> str:
    """Why a method does not register ('' when it does): below no registration in Dice, or
    folding beyond the bound. The accuracy table prints it; the speed profile's guard never
    takes a flagged model as its reference."""
    flags = []
    if dice == dice and identity_dice == identity_dice:  # both known (not NaN)
        if dice < identity_dice:
            # the difference spelled out: a model a hair below no registration read "0.198 < 0.198"
            flags.append(f"below no registration (Dice {dice:.3f} against {identity_dice:.3f}: "
                         f"{dice - identity_dice:+.2g})")
        elif dice < identity_dice + NO_GAIN_DICE:
            # a model left at (or near) the zero field is no registration, not a result
            flags.append(f"no better than no registration (Dice {dice:.3f}, gain < {NO_GAIN_DICE:g})")
    if folding_percent == folding_percent and folding_percent > FOLDING_BOUND_PERCENT:
        flags.append(f"folding {folding_percent:.2f} % > {FOLDING_BOUND_PERCENT:g} %")
    return "; ".join(flags)
