"""Evaluation metrics on numpy arrays, with voxel spacing in millimetres.

Conventions are those of MONAI and of the Learn2Reg evaluation, so that figures can be set
beside the literature's: a structure of the truth that the warp loses scores Dice 0 (not
NaN); HD95 is the larger of the two directed 95th percentiles of surface distance; SDlogJ is
Learn2Reg's (log of the determinant + 3, two border voxels cropped). Checked against MONAI and
independent code in tests/test_metrics.py.

Dice counts overlaps for all labels at once with one ``bincount`` (fast for 100+ labels);
HD95 finds nearest surface points with scipy's k-d tree, all structures' surfaces found in one pass."""
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


def _surface_points(labels: np.ndarray, spacing) -> dict:
    """Every structure's surface voxels as points in mm: the voxels of a label with a
    6-neighbour of another label or on the map's border (what ``mask & ~binary_erosion(mask)``
    keeps, for all labels in one pass over the map)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        head = [slice(None)] * labels.ndim
        tail = [slice(None)] * labels.ndim
        head[axis], tail[axis] = slice(1, None), slice(None, -1)
        differs = labels[tuple(head)] != labels[tuple(tail)]
        edge[tuple(head)] |= differs
        edge[tuple(tail)] |= differs
        head[axis], tail[axis] = 0, -1
        edge[tuple(head)] = edge[tuple(tail)] = True
    where = np.flatnonzero(edge & (labels != 0))
    owner = labels.ravel()[where]
    order = np.argsort(owner, kind="stable")
    where, owner = where[order], owner[order]
    points = np.column_stack(np.unravel_index(where, labels.shape)) * np.asarray(spacing, dtype=float)
    names, starts = np.unique(owner, return_index=True)
    ends = np.append(starts[1:], owner.size)
    return {int(n): points[a:b] for n, a, b in zip(names, starts, ends)}


def hd95(pred, truth, spacing=(1.0, 1.0, 1.0), labels=None) -> dict:
    """95th percentile Hausdorff distance (mm) per label: the larger of the two directed 95th
    percentiles of surface-to-surface distance (MONAI's ``compute_hausdorff_distance`` with
    ``percentile=95``, and Learn2Reg's). NaN where a label is absent from either map (no
    surface to measure: such a label scores Dice 0). Nearest surface points by k-d tree (the
    same distances as a distance transform, at half its time on a 1 mm brain's 116 labels)."""
    from scipy.spatial import cKDTree

    pred, truth = _check_labels(pred, truth)
    if labels is None:
        labels = np.union1d(np.unique(pred), np.unique(truth))
    surfaces_p, surfaces_t = _surface_points(pred, spacing), _surface_points(truth, spacing)
    out = {}
    for label in (int(l) for l in labels if l != 0):
        surf_p, surf_t = surfaces_p.get(label), surfaces_t.get(label)
        if surf_p is None or surf_t is None:
            out[label] = float("nan")
            continue
        to_t = cKDTree(surf_t).query(surf_p, workers=-1)[0]
        to_p = cKDTree(surf_p).query(surf_t, workers=-1)[0]
        out[label] = float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))
    return out


def jacobian_determinant(field, spacing=None, dtype=torch.float64, slab: int = 8) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + u(x)`` for a field (3, D, H, W) in voxels
    (central differences inside, one-sided at the borders); ``dtype`` float32 is about three
    times faster (what a batch's folding check uses), float64 what the metrics use. Computed
    ``slab`` planes at a time (each with its neighbour planes, so every difference is the one the
    whole field gives): the slab's nine derivatives stay in cache, 4x faster on a 1 mm field."""
    field = np.asarray(field)
    if field.ndim != 4 or field.shape[0] != 3:
        raise ValueError(f"field: expected shape (3, D, H, W), got {field.shape}")
    u = torch.as_tensor(field)
    depth = u.shape[1]
    det = torch.empty(u.shape[1:], dtype=dtype)
    for start in range(0, depth, slab):
        stop = min(start + slab, depth)
        low, high = max(start - 1, 0), min(stop + 1, depth)
        det[start:stop] = _determinant(u[:, low:high].to(dtype))[start - low:stop - low]
    return det.numpy()


def _determinant(u: torch.Tensor) -> torch.Tensor:
    # j[i][k] = d(x + u)_i / dx_k; the determinant by cofactors in torch (multi-threaded)
    j = [list(torch.gradient(u[i])) for i in range(3)]
    for i in range(3):
        j[i][i] = j[i][i] + 1
    det = j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
    det -= j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
    det += j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    return det


def folding_fraction(field) -> float:
    """Fraction of voxels where the Jacobian determinant is <= 0 (the map folds)."""
    return _folding(jacobian_determinant(field))


def sd_log_jacobian(field, convention: str = "learn2reg") -> float:
    """Standard deviation of the log Jacobian determinant (SDlogJ).

    ``learn2reg`` (the default, comparable with the challenge's leaderboards): log of the
    determinant + 3, clipped to [1e-9, 1e9], over the field without its two outermost voxels
    on each side (fields smaller than 5 voxels in a dimension are not cropped). ``plain``:
    log of the determinant clipped below at 1e-9, over every voxel."""
    return _sd_log(jacobian_determinant(field), convention)


def jacobian_summary(field) -> dict:
    """``folding_fraction`` and ``sdlogj`` (Learn2Reg's) from one Jacobian determinant (the
    determinant is most of either's time on a 1 mm field)."""
    det = jacobian_determinant(field)
    return {"folding_fraction": _folding(det), "sdlogj": _sd_log(det, "learn2reg")}


def _folding(det: np.ndarray) -> float:
    return float((det <= 0).mean())


def _sd_log(det: np.ndarray, convention: str) -> float:
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
