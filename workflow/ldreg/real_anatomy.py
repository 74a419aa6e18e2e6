"""A real anatomy that no model saw in training, at its own resolution: pairs for the check of
how the models do where users register.

Default subject: Colin Holmes' single-subject T1 at 1 mm (colin27, skull-stripped, ``ch2bet``)
with the AAL atlas (116 labels) drawn on it, both shipped by Debian's ``mricron-data`` package
(``/usr/share/mricron/templates``). The models train on warped copies of the MNI152 template,
an average of 152 brains: this is one brain, scanned on another scanner. Each pair registers a
moved copy of the scan (a seeded random smooth deformation with a small affine part, plus a
gamma, a bias field and noise) back to the scan itself, so that the labels of both sides are
known exactly.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .data import SyntheticConfig, deform_volume, intensity_changes, random_deformation
from .preprocessing import grid_at_spacing, mask_bounds, resample_to_grid
from .io import InputError, check_same_grid, load_volume, save_volume, write_csv

log = logging.getLogger(__name__)

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")


@dataclass
class RealAnatomyConfig:
    image: str = str(MRICRON_TEMPLATES / "ch2bet.nii.gz")
    labels: str = str(MRICRON_TEMPLATES / "aal.nii.gz")
    pairs: int = 3
    seed: int = 0
    spacing_mm: float | None = None  # resampled to this isotropic spacing first (None: the scan's own)
    margin_vox: int = 4  # kept around the brain's bounding box
    coarse_factor: int = 3  # the random map is drawn on a grid this many times coarser
    # a little smaller than the synthetic cohort's (4 mm, 4 degrees, 4 mm, 4 %): on Colin27 the
    # moved copies' mean displacement in the brain is 4.5-5.8 mm, at most 13-17 mm, and no
    # registration scores Dice 0.54-0.61 over the 116 AAL labels
    deformation_mm: float = 3.0
    smoothness_mm: float = 12.0
    rotation_deg: float = 3.0
    translation_mm: float = 3.0
    scaling: float = 0.03


def check_sources(image, labels) -> None:
    """Both files exist, or a message that says how to get them."""
    missing = [str(p) for p in (image, labels) if not Path(p).exists()]
    if missing:
        raise InputError(f"{', '.join(missing)}: not found. The real-anatomy check reads Colin27 and the AAL atlas "
                         "from Debian's mricron-data package (apt-get install mricron-data); or point "
                         "real_anatomy.image / real_anatomy.labels at a T1 scan and its label map of your own, or set "
                         "real_anatomy.enabled: false")


def _crop_box(mask: np.ndarray, margin: int, factor: int) -> tuple[slice, ...]:
    """The mask's bounding box grown by ``margin``, each side's length made ``factor * k + 1``
    (so that the coarse grid's corners fall on voxels)."""
    box = []
    for first, last in zip(*mask_bounds(mask)):
        lo, hi = max(first - margin, 0), last + margin + 1
        length = hi - lo
        length += (1 - length) % factor
        box.append(slice(lo, lo + length))
    return tuple(box)


def _padded(data: np.ndarray, box) -> np.ndarray:
    """``data[box]`` with zeros where the box reaches past the array."""
    out = np.zeros(tuple(s.stop - s.start for s in box), dtype=data.dtype)
    src = tuple(slice(s.start, min(s.stop, n)) for s, n in zip(box, data.shape))
    out[tuple(slice(0, r.stop - r.start) for r in src)] = data[src]
    return out


def make_real_anatomy_pairs(cfg: RealAnatomyConfig, out_dir) -> pd.DataFrame:
    """The fixed scan (cropped to the brain, scaled to [0, 1]) and ``cfg.pairs`` moved copies,
    each with its label map, as NIfTI files; returns and writes the manifest ``pairs.csv``
    (pair_id, moving, moving_labels, fixed, fixed_labels, the true map's displacement in mm)."""
    check_sources(cfg.image, cfg.labels)
    image, img = load_volume(cfg.image, "image")
    labels, labels_img = load_volume(cfg.labels, "labels")
    check_same_grid(cfg.image, img, cfg.labels, labels_img)
    if cfg.spacing_mm:  # e.g. a quick run at a coarser spacing than the scan's
        shape, target = grid_at_spacing(img, cfg.spacing_mm)
        image = resample_to_grid(image, img.affine, shape, target, order=1)
        labels = resample_to_grid(labels, img.affine, shape, target, order=0)
        img = nib.Nifti1Image(image, target)
    spacing = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.allclose(spacing, spacing[0], rtol=1e-3):
        raise InputError(f"{cfg.image}: the real-anatomy check needs isotropic voxels, got {tuple(spacing)} mm")
    box = _crop_box((image > 0) | (labels > 0), cfg.margin_vox, cfg.coarse_factor)
    image, labels = _padded(image, box), _padded(labels, box)
    affine = img.affine.copy()
    affine[:3, 3] = nib.affines.apply_affine(img.affine, [s.start for s in box])
    image = np.clip(image / np.percentile(image[image > 0], 99.5), 0, 1).astype(np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fixed, fixed_labels = out_dir / "fixed_image.nii.gz", out_dir / "fixed_labels.nii.gz"
    save_volume(fixed, image, affine)
    save_volume(fixed_labels, labels.astype(np.int16), affine)
    coarse_spacing = cfg.coarse_factor * float(spacing[0])
    coarse_shape = tuple((s - 1) // cfg.coarse_factor + 1 for s in image.shape)
    deformation = SyntheticConfig(spacing_mm=coarse_spacing, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                                  if f.name in ("deformation_mm", "smoothness_mm", "rotation_deg", "translation_mm",
                                                "scaling")})
    brain = labels > 0
    rows = []
    for k in range(cfg.pairs):
        rng = np.random.default_rng([cfg.seed, 1000 + k])  # apart from the synthetic cohort's streams
        forward, _ = random_deformation(coarse_shape, deformation, rng)
        moved, moved_labels = deform_volume(image, labels, forward, image.shape, cfg.coarse_factor)
        moved = intensity_changes(moved, deformation, rng).astype(np.float32)
        moving, moving_labels = out_dir / f"moved{k + 1}_image.nii.gz", out_dir / f"moved{k + 1}_labels.nii.gz"
        save_volume(moving, moved, affine)
        save_volume(moving_labels, moved_labels.astype(np.int16), affine)
        # the displacement's size inside the brain, in mm (on the coarse grid: every 3rd voxel)
        mm = coarse_spacing * np.linalg.norm(forward[0].numpy(), axis=0)
        inside = brain[tuple(slice(0, None, cfg.coarse_factor) for _ in range(3))]
        rows.append({"pair_id": f"colin27_moved{k + 1}", "moving": str(moving), "moving_labels": str(moving_labels),
                     "fixed": str(fixed), "fixed_labels": str(fixed_labels), "spacing_mm": float(spacing[0]),
                     "shape": "x".join(map(str, image.shape)), "labels": int(len(np.unique(labels)) - 1),
                     "true_displacement_mean_mm": float(mm[inside].mean()),
                     "true_displacement_max_mm": float(mm[inside].max()), "seed": cfg.seed})
        log.info("real-anatomy pair %d/%d: %s, displacement mean %.1f mm, max %.1f mm", k + 1, cfg.pairs,
                 rows[-1]["shape"], rows[-1]["true_displacement_mean_mm"], rows[-1]["true_displacement_max_mm"])
    manifest = pd.DataFrame(rows)
    write_csv(manifest, out_dir / "pairs.csv")
    return manifest
