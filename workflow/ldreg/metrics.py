"""Evaluation metrics on numpy arrays, with voxel spacing in millimetres.

Conventions are those of MONAI and of the Learn2Reg evaluation, so that figures can be set
beside the literature's: a structure of the truth that the warp loses scores Dice 0 (not
NaN); HD95 is the larger of the two directed 95th percentiles of surface distance; SDlogJ is
Learn2Reg's (log of the determinant + 3, two border voxels cropped). Checked against MONAI and
independent code in tests/test_metrics.py.

Dice counts overlaps for all labels at once with one ``bincount`` (fast for 100+ labels);
HD95 uses scipy's Euclidean distance transform on each structure's bounding box."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def _check_same(name_a, a, name_b, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape} must have one shape")
    return a, b


def _check_labels(pred, truth):
    pred, truth = _check_same("pred", pred, "truth", truth)
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(truth.dtype, np.integer)):
        raise ValueError(f"label maps must be integer arrays, got {pred.dtype} and {truth.dtype}")
    for name, m in (("pred", pred), ("truth", truth)):
        if m.size and m.min() < 0:
            raise ValueError(f"{name} label map has negative label values (min {m.min()}): labels must be >= 0")
    return pred, truth


def dice_per_label(pred, truth, labels=None) -> dict:
    """Dice of every label (background 0 excluded), as MONAI (``ignore_empty``) and Learn2Reg
    score it: a label absent from the truth is NaN (nothing to find), a label of the truth that
    the prediction lost is 0."""
    pred, truth = _check_labels(pred, truth)
    if labels is None:
        labels = np.union1d(np.unique(pred), np.unique(truth))
    labels = np.asarray([int(l) for l in labels if l != 0], dtype=np.int64)
    if labels.size == 0:
        return {}
    # map labels to 1..K, everything else to 0, then count pairs with a single bincount
    top = int(max(pred.max(initial=0), truth.max(initial=0), labels.max())) + 1
    lut = np.zeros(top, dtype=np.int64)
    lut[labels] = np.arange(1, labels.size + 1)
    p = lut[pred.ravel()]
    t = lut[truth.ravel()]
    k = labels.size + 1
    size_p = np.bincount(p, minlength=k)
    size_t = np.bincount(t, minlength=k)
    both = np.bincount(p[p == t], minlength=k)
    out = {}
    for i, label in enumerate(labels, start=1):
        if size_t[i] == 0:
            out[int(label)] = float("nan")
        else:
            out[int(label)] = 2.0 * both[i] / (size_p[i] + size_t[i])
    return out


def mean_dice(pred, truth, labels=None) -> float:
    values = np.array(list(dice_per_label(pred, truth, labels).values()), dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _surface(mask):
    return mask & ~ndimage.binary_erosion(mask)


def hd95(pred, truth, spacing=(1.0, 1.0, 1.0), labels=None) -> dict:
    """95th percentile Hausdorff distance (mm) per label: the larger of the two directed 95th
    percentiles of surface-to-surface distance (MONAI's ``compute_hausdorff_distance`` with
    ``percentile=95``, and Learn2Reg's). NaN where a label is absent from either map (no
    surface to measure: such a label scores Dice 0)."""
    pred, truth = _check_labels(pred, truth)
    if labels is None:
        labels = np.union1d(np.unique(pred), np.unique(truth))
    out = {}
    objects_p = ndimage.find_objects(pred.astype(np.int64))
    objects_t = ndimage.find_objects(truth.astype(np.int64))
    for label in (int(l) for l in labels if l != 0):
        sp = objects_p[label - 1] if label - 1 < len(objects_p) else None
        st = objects_t[label - 1] if label - 1 < len(objects_t) else None
        if sp is None or st is None:
            out[label] = float("nan")
            continue
        box = tuple(slice(max(min(a.start, b.start) - 1, 0), max(a.stop, b.stop) + 1) for a, b in zip(sp, st))
        mp, mt = pred[box] == label, truth[box] == label
        surf_p, surf_t = _surface(mp), _surface(mt)
        dist_to_t = ndimage.distance_transform_edt(~surf_t, sampling=spacing)
        dist_to_p = ndimage.distance_transform_edt(~surf_p, sampling=spacing)
        out[label] = float(max(np.percentile(dist_to_t[surf_p], 95), np.percentile(dist_to_p[surf_t], 95)))
    return out


def jacobian_determinant(field, spacing=None, dtype=torch.float64) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + u(x)`` for a field (3, D, H, W) in voxels
    (central differences inside, one-sided at the borders); ``dtype`` float32 is about three
    times faster (what a batch's folding check uses), float64 what the metrics use."""
    field = np.asarray(field)
    if field.ndim != 4 or field.shape[0] != 3:
        raise ValueError(f"field: expected shape (3, D, H, W), got {field.shape}")
    u = torch.as_tensor(field, dtype=dtype)
    # j[i][k] = d(x + u)_i / dx_k; the determinant by cofactors in torch (multi-threaded, float64:
    # half of numpy's gradients + np.linalg.det on a 1 mm brain's field)
    j = [list(torch.gradient(u[i])) for i in range(3)]
    for i in range(3):
        j[i][i] = j[i][i] + 1
    det = j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
    det -= j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
    det += j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    return det.numpy()


def folding_fraction(field) -> float:
    """Fraction of voxels where the Jacobian determinant is <= 0 (the map folds)."""
    return float((jacobian_determinant(field) <= 0).mean())


def sd_log_jacobian(field, convention: str = "learn2reg") -> float:
    """Standard deviation of the log Jacobian determinant (SDlogJ).

    ``learn2reg`` (the default, comparable with the challenge's leaderboards): log of the
    determinant + 3, clipped to [1e-9, 1e9], over the field without its two outermost voxels
    on each side (fields smaller than 5 voxels in a dimension are not cropped). ``plain``:
    log of the determinant clipped below at 1e-9, over every voxel."""
    det = jacobian_determinant(field)
    if convention == "learn2reg":
        if min(det.shape) > 4:
            det = det[2:-2, 2:-2, 2:-2]
        return float(np.log(np.clip(det + 3, 1e-9, 1e9)).std())
    if convention == "plain":
        return float(np.log(np.clip(det, 1e-9, None)).std())
    raise ValueError(f"unknown SDlogJ convention {convention!r}: expected 'learn2reg' or 'plain'")


def landmark_tre(fixed_points, moving_points, field, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Target registration error (mm) per landmark: fixed landmarks (N, 3, voxels) are moved by
    the field (trilinear) and compared with the corresponding moving landmarks."""
    fixed_points = np.asarray(fixed_points, dtype=np.float64)
    moving_points = np.asarray(moving_points, dtype=np.float64)
    if fixed_points.shape != moving_points.shape or fixed_points.ndim != 2 or fixed_points.shape[1] != 3:
        raise ValueError(f"landmarks: expected two (N, 3) arrays, got {fixed_points.shape} and {moving_points.shape}")
    field = np.asarray(field, dtype=np.float64)
    disp = np.stack([ndimage.map_coordinates(field[i], fixed_points.T, order=1, mode="nearest") for i in range(3)], 1)
    return np.linalg.norm((fixed_points + disp - moving_points) * np.asarray(spacing), axis=1)


def field_error(field, true_field, spacing=(1.0, 1.0, 1.0), mask=None) -> dict:
    """End-point error (mm) of a field against a known true field, both (3, D, H, W) voxels."""
    field, true_field = _check_same("field", field, "true field", true_field)
    err = np.linalg.norm((field - true_field) * np.asarray(spacing).reshape(3, 1, 1, 1), axis=0)
    if mask is not None:
        err = err[np.asarray(mask, dtype=bool)]
    return {"epe_mean_mm": float(err.mean()), "epe_p95_mm": float(np.percentile(err, 95))}
