"""Preprocessing, one path for every data set and the same one ``register`` applies: the
grids (the model's grid around an image's foreground, a grid at a given spacing), robust
intensity normalisation, resampling. Kept apart from :mod:`ldreg.data` (cohorts, downloads)
so that registering a pair imports neither pandas nor scipy."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .warp import grid_sample_threaded


def mask_bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index along each axis where ``mask`` (3D) holds, from its projections on
    the axes (no list of voxels); the whole volume when it holds nowhere."""
    first, last = np.zeros(3, dtype=int), np.array(mask.shape) - 1
    if mask.any():
        for axis in range(3):
            hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            first[axis], last[axis] = hits[0], hits[-1]
    return first, last


def _world_extent(img, first, last) -> tuple[np.ndarray, np.ndarray]:
    """World-space (RAS mm) minimum and maximum of the voxel box ``first``..``last`` of ``img``."""
    corners = np.array([[i, j, k] for i in (first[0], last[0]) for j in (first[1], last[1]) for k in (first[2], last[2])])
    world = nib.affines.apply_affine(img.affine, corners)
    return world.min(0), world.max(0)


def grid_at_spacing(img, spacing: float, box=None, margin_mm: float = 0.0):
    """A RAS grid of the given isotropic spacing covering ``img``'s field of view, or the voxel
    box ``(first, last)`` of it grown by ``margin_mm`` (within the field of view)."""
    whole = (np.zeros(3, int), np.array(img.shape[:3]) - 1)
    lo, hi = _world_extent(img, *whole)
    if box is not None:
        box_lo, box_hi = _world_extent(img, *box)
        lo, hi = np.maximum(box_lo - margin_mm, lo), np.minimum(box_hi + margin_mm, hi)
    shape = tuple(int(np.floor((h - l) / spacing)) + 1 for l, h in zip(lo, hi))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    return shape, affine


@dataclass
class Preprocessing:
    spacing_mm: float = 3.0
    grid: tuple = (48, 64, 48)
    percentiles: tuple = (0.5, 99.5)
    foreground_fraction: float = 0.1  # foreground: above this fraction of the intensity range

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """From a config's or a model file's ``preprocessing`` mapping (lists for the tuples)."""
        return cls(spacing_mm=float(d["spacing_mm"]), grid=tuple(d["grid"]), percentiles=tuple(d["percentiles"]),
                   foreground_fraction=float(d["foreground_fraction"]))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"], d["percentiles"] = list(self.grid), list(self.percentiles)
        return d


def target_grid(img, data: np.ndarray, prep: Preprocessing, robust_range) -> np.ndarray:
    """RAS affine of the preprocessed grid: configured spacing, centred on the foreground's
    bounding box in world space (the box is cropped or padded to the grid). ``robust_range`` is
    the image's 1st and 99th percentile."""
    lo, hi = robust_range
    world_lo, world_hi = _world_extent(img, *mask_bounds(data > lo + prep.foreground_fraction * (hi - lo)))
    centre = (world_lo + world_hi) / 2
    affine = np.diag([prep.spacing_mm] * 3 + [1.0])
    affine[:3, 3] = centre - prep.spacing_mm * (np.array(prep.grid) - 1) / 2
    return affine


def percentiles(data: np.ndarray, qs) -> np.ndarray:
    """``np.percentile(data, qs)`` (linear interpolation) from one partial sort of the values
    the interpolation needs: half the time of ``np.percentile`` on a 128^3 volume."""
    flat = data.ravel(order="K")  # no copy, whatever the memory order
    positions = np.asarray(qs, dtype=np.float64) / 100 * (flat.size - 1)
    below = np.floor(positions).astype(np.int64)
    above = np.minimum(below + 1, flat.size - 1)
    part = np.partition(flat, np.unique(np.concatenate([below, above])))
    return part[below] + (positions - below) * (part[above] - part[below])


def normalise(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Intensities mapped to [0, 1] between ``lo`` and ``hi`` (clipped)."""
    scaled = torch.from_numpy(np.asarray(data, dtype=np.float32)).sub(float(lo)).div_(max(float(hi - lo), 1e-6))
    return scaled.clamp_(0, 1).numpy()


def _shifted_copy(data: np.ndarray, offset, shape) -> np.ndarray:
    """Target voxel ``t`` takes source voxel ``t + offset`` (zero outside the source)."""
    if not any(offset) and data.shape == tuple(shape):
        return data
    out = np.zeros(shape, dtype=data.dtype)
    src, dst = [], []
    for n_src, n_dst, o in zip(data.shape, shape, offset):
        start, stop = max(0, -o), min(n_dst, n_src - o)
        if stop <= start:
            return out
        dst.append(slice(start, stop))
        src.append(slice(start + o, stop + o))
    out[tuple(dst)] = data[tuple(src)]
    return out


def resample_to_grid(data: np.ndarray, source_affine, shape, target_affine, order: int = 1) -> np.ndarray:
    """Resample ``data`` (on ``source_affine``) onto the grid ``shape`` / ``target_affine``:
    trilinear (order 1) or nearest (order 0), zero outside the source. A target grid that is
    the source grid shifted by whole voxels (an input already on the model's grid) is a crop
    or pad; anything else is one torch ``grid_sample`` (multi-threaded, unlike scipy's)."""
    vox = np.linalg.inv(source_affine) @ target_affine  # target voxel -> source voxel
    shift = vox[:3, 3]
    if np.allclose(vox[:3, :3], np.eye(3), atol=1e-6) and np.allclose(shift, np.round(shift), atol=1e-4):
        return _shifted_copy(data, np.round(shift).astype(int), tuple(shape))
    src_n, dst_n = np.array(data.shape, float), np.array(shape, float)
    # in grid_sample's [-1, 1] units (align_corners): n = 2 v / (size - 1) - 1
    to_vox = np.diag(list((dst_n - 1) / 2) + [1.0])
    to_vox[:3, 3] = (dst_n - 1) / 2
    to_norm = np.diag(list(2 / np.maximum(src_n - 1, 1)) + [1.0])
    to_norm[:3, 3] = -1
    theta = to_norm @ vox @ to_vox
    theta = theta[[2, 1, 0]][:, [2, 1, 0, 3]]  # grid_sample's coordinates are x, y, z = W, H, D
    # float64 keeps every integer label exact under nearest sampling
    dtype = torch.float64 if order == 0 else torch.float32
    theta_t = torch.from_numpy(theta[None].astype(np.float64)).to(dtype)
    grid = F.affine_grid(theta_t, [1, 1, *shape], align_corners=True)
    source = torch.from_numpy(np.ascontiguousarray(data)).to(dtype)[None, None]
    out = grid_sample_threaded(source, grid, "bilinear" if order else "nearest", "zeros")
    return out[0, 0].numpy().astype(data.dtype if order == 0 else np.float32)


def preprocess_array(data: np.ndarray, img, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """An image already read and checked (``data`` on ``img``'s grid), normalised and resampled
    into the preprocessed grid. Returns (image, preprocessed affine)."""
    # one partial sort for both the foreground threshold and the normalisation
    lo1, hi99, lo, hi = percentiles(data, [1, 99, *prep.percentiles])
    affine = target_grid(img, data, prep, (lo1, hi99))
    return resample_to_grid(normalise(data, lo, hi), img.affine, prep.grid, affine, order=1), affine
