"""What users would pick instead, measured on the same pairs and CPU: ANTs SyN (antspyx) and
Greedy (picsl-greedy, the fast C++ per-pair registration of the PICSL lab).

VoxelMorph is a network kind of its own (``CascadeSpec(kind="voxelmorph")``, MONAI's
VoxelMorph U-Net with diffeomorphic integration) and is trained, evaluated and timed by the
same code as the students. ANTs and Greedy are iterative optimisation with no model file, so
they get their own predictors and timing here: on arrays for the model-grid table, and on NIfTI
files end to end (read, register, reslice image and labels, write) as their users run them."""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

import numpy as np
import torch

from .io import InputError, itk_array_to_field
from .warp import identity_grid

ANTS_AVAILABLE = importlib.util.find_spec("ants") is not None
GREEDY_AVAILABLE = importlib.util.find_spec("picsl_greedy") is not None


@dataclass(frozen=True)
class PeerRun:
    """One end-to-end registration of NIfTI files by a peer: stage seconds (``preprocess``,
    ``network`` = the registration, ``warp`` = reslicing image and labels, ``write``) and the
    files it wrote; ``warp_file`` is its deformable displacement field (ITK convention)."""

    times: dict
    warped: Path
    warped_labels: Path | None
    warp_file: Path


def ants_missing_note() -> str:
    return "skipped: antspyx is not installed (pip install -e '.[peers]')"


def ants_syn_field(moving: np.ndarray, fixed: np.ndarray, spacing: float, threads: int = 1) -> np.ndarray:
    """Displacement (3, D, H, W) in voxels from ANTs SyN (with its affine initialisation): the
    fixed grid's voxel coordinates are pushed through ANTs' own transform chain."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    as_ants = lambda a: ants.from_numpy(np.ascontiguousarray(a, dtype=np.float32), spacing=(spacing,) * 3)
    reg = ants.registration(fixed=as_ants(fixed), moving=as_ants(moving), type_of_transform="SyN", random_seed=0)
    # coordinate images on a grid grown by a margin, so points mapped just outside the volume
    # still read their (linear, hence exactly extended) coordinate instead of ANTs' fill value
    margin = 16
    axes = [np.arange(-margin, s + margin, dtype=np.float32) for s in fixed.shape]
    big = np.stack(np.meshgrid(*axes, indexing="ij"))
    origin = (-margin * spacing,) * 3
    coords = [ants.apply_transforms(fixed=as_ants(fixed), transformlist=reg["fwdtransforms"], interpolator="linear",
                                    moving=ants.from_numpy(np.ascontiguousarray(big[i]), origin=origin, spacing=(spacing,) * 3)
                                    ).numpy() for i in range(3)]
    return (np.stack(coords) - identity_grid(fixed.shape).numpy()).astype(np.float32)


def ants_register_files(moving_path, fixed_path, labels_path, out_dir, threads: int = 1) -> PeerRun:
    """What a user of ANTs does for one pair of NIfTI files, timed by stage as ``register`` is:
    read (``preprocess``), SyN with its affine initialisation (``network``: the registration),
    the image (linear) and label map (nearest neighbour) warped onto the fixed grid (``warp``),
    both written as .nii (``write``). The displacement field is ANTs' own warp file, which the
    registration writes itself (so its time is inside ``network``)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    out_dir = Path(out_dir)
    times, t = {}, time.perf_counter()
    moving, fixed = ants.image_read(str(moving_path)), ants.image_read(str(fixed_path))
    labels = ants.image_read(str(labels_path)) if labels_path else None
    times["preprocess"], t = time.perf_counter() - t, time.perf_counter()
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN", random_seed=0,
                            outprefix=str(out_dir / "ants_"))
    times["network"], t = time.perf_counter() - t, time.perf_counter()
    warped = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=reg["fwdtransforms"], interpolator="linear")
    warped_labels = None if labels is None else ants.apply_transforms(
        fixed=fixed, moving=labels, transformlist=reg["fwdtransforms"], interpolator="nearestNeighbor")
    times["warp"], t = time.perf_counter() - t, time.perf_counter()
    ants.image_write(warped, str(out_dir / "warped.nii"))
    if warped_labels is not None:
        ants.image_write(warped_labels, str(out_dir / "warped_labels.nii"))
    times["write"] = time.perf_counter() - t
    # fwdtransforms: [SyN warp, affine]; the warp is the deformable part (the affine's
    # determinant is one positive constant: folding and SDlogJ are the warp's)
    warp_file = next(Path(f) for f in reg["fwdtransforms"] if str(f).endswith(".nii.gz"))
    return PeerRun(times, out_dir / "warped.nii", out_dir / "warped_labels.nii" if labels is not None else None,
                   warp_file)


def ants_predictor(spacing: float, threads: int = 1):
    def predict(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        field = ants_syn_field(moving[0, 0].numpy(), fixed[0, 0].numpy(), spacing, threads)
        return torch.from_numpy(field)[None]

    return predict


# --------------------------------------------------------------------------------- Greedy


def greedy_missing_note() -> str:
    return "skipped: picsl-greedy is not installed (pip install -e '.[peers]')"


@dataclass(frozen=True)
class GreedySetting:
    """One Greedy configuration: iterations per level (coarse to fine, e.g. '10x5x0': 10 at
    4x downsampling, 5 at 2x, none at full resolution) and the metric (local NCC, radius 2)."""

    iterations: str = "10x5x0"
    metric: str = "NCC 2x2x2"

    def __post_init__(self):
        levels = self.iterations.split("x")
        if not levels or not all(level.isdigit() for level in levels):
            raise ValueError(f"Greedy iterations must read like '10x5x0', got {self.iterations!r}")


def greedy_setting(settings: dict, name: str) -> GreedySetting:
    """The named entry of ``settings`` (name -> GreedySetting: the enabled ``peers.greedy.settings``)."""
    if name not in settings:
        raise ValueError(f"peer_greedy_{name}: no setting {name!r} in peers.greedy.settings ({sorted(settings)}; "
                         "none when peers.greedy.enabled is false)")
    return settings[name]


def _greedy(command: str, log_path: Path) -> None:
    """One Greedy command (its command-line syntax) in this process; its chatter to ``log_path``."""
    from picsl_greedy import Greedy3D

    with open(log_path, "a") as log:
        try:
            Greedy3D().execute(command, out=log, err=log)
        except Exception as exc:  # Greedy raises RuntimeError with its own message
            raise InputError(f"Greedy failed on '{command}': {exc} (its output: {log_path})") from None


def greedy_register_files(moving_path, fixed_path, labels_path, out_dir, threads: int = 1,
                          setting: GreedySetting = GreedySetting()) -> PeerRun:
    """What a user of Greedy does for one pair of NIfTI files: deformable registration (its
    reading of the images inside; the warp file it writes, too) then reslicing the image
    (linear) and the label map (nearest neighbour) onto the fixed grid. Every output is .nii,
    the warp included, as `register`'s are in the tables: a .nii.gz warp would add its
    compression to Greedy's time (measured in docs/experiments.md, 2026-12-06).
    No affine stage: the pairs here differ by a few degrees and millimetres, which the coarse
    levels absorb."""
    out_dir = Path(out_dir)
    log_path, warp = out_dir / "greedy.log", out_dir / "greedy_warp.nii"
    times, t = {"preprocess": 0.0}, time.perf_counter()
    _greedy(f"-d 3 -threads {threads} -i {fixed_path} {moving_path} -o {warp} -m {setting.metric} "
            f"-n {setting.iterations}", log_path)
    times["network"], t = time.perf_counter() - t, time.perf_counter()
    reslice = f"-d 3 -threads {threads} -rf {fixed_path} -rm {moving_path} {out_dir / 'warped.nii'}"
    if labels_path:
        reslice += f" -ri NN -rm {labels_path} {out_dir / 'warped_labels.nii'}"
    _greedy(f"{reslice} -r {warp}", log_path)
    times["warp"], times["write"] = time.perf_counter() - t, 0.0  # written by the reslicing itself
    return PeerRun(times, out_dir / "warped.nii", out_dir / "warped_labels.nii" if labels_path else None, warp)


def greedy_field(moving: np.ndarray, fixed: np.ndarray, spacing: float, threads: int = 1,
                 setting: GreedySetting = GreedySetting()) -> np.ndarray:
    """Displacement (3, D, H, W) in voxels from Greedy on two arrays on the same grid."""
    affine = np.diag([spacing] * 3 + [1.0])
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / name for name in ("moving.nii", "fixed.nii")]
        for path, data in zip(paths, (moving, fixed)):
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine), str(path))
        warp = Path(tmp) / "warp.nii"
        _greedy(f"-d 3 -threads {threads} -i {paths[1]} {paths[0]} -o {warp} -m {setting.metric} "
                f"-n {setting.iterations}", Path(tmp) / "greedy.log")
        return itk_array_to_field(np.asarray(nib.load(str(warp)).dataobj), affine)


def greedy_predictor(spacing: float, threads: int, setting: GreedySetting):
    def predict(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(greedy_field(moving[0, 0].numpy(), fixed[0, 0].numpy(), spacing, threads, setting))[None]

    return predict
