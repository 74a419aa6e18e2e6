"""What users would pick instead, measured on the same pairs and CPU: ANTs SyN (antspyx).

VoxelMorph is a network kind of its own (``CascadeSpec(kind="voxelmorph")``, MONAI's
VoxelMorph U-Net with diffeomorphic integration) and is trained, evaluated and timed by the
same code as the students. ANTs is iterative optimisation with no model file, so it gets its
own predictor and timing here."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import torch

from .timing import time_calls
from .warp import identity_grid

ANTS_AVAILABLE = importlib.util.find_spec("ants") is not None


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


def ants_register_files(moving_path, fixed_path, labels_path, out_dir, threads: int = 1) -> dict:
    """What a user of ANTs does for one pair of NIfTI files, timed by stage as ``register`` is:
    read (``preprocess``), SyN with its affine initialisation (``network``: the registration),
    the image (linear) and label map (nearest neighbour) warped onto the fixed grid (``warp``),
    both written as .nii (``write``). The displacement field is ANTs' own warp file, which the
    registration writes itself (so its time is inside ``network``)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    times, t = {}, time.perf_counter()
    moving, fixed, labels = (ants.image_read(str(p)) for p in (moving_path, fixed_path, labels_path))
    times["preprocess"], t = time.perf_counter() - t, time.perf_counter()
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN", random_seed=0,
                            outprefix=str(Path(out_dir) / "ants_"))
    times["network"], t = time.perf_counter() - t, time.perf_counter()
    warped = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=reg["fwdtransforms"], interpolator="linear")
    warped_labels = ants.apply_transforms(fixed=fixed, moving=labels, transformlist=reg["fwdtransforms"],
                                          interpolator="nearestNeighbor")
    times["warp"], t = time.perf_counter() - t, time.perf_counter()
    ants.image_write(warped, str(Path(out_dir) / "warped.nii"))
    ants.image_write(warped_labels, str(Path(out_dir) / "warped_labels.nii"))
    times["write"] = time.perf_counter() - t
    return times


def ants_predictor(spacing: float, threads: int = 1):
    def predict(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        field = ants_syn_field(moving[0, 0].numpy(), fixed[0, 0].numpy(), spacing, threads)
        return torch.from_numpy(field)[None]

    return predict


def time_ants(grid, spacing: float, threads: int, repeats: int, warmup: int) -> dict:
    """Median seconds of one SyN registration of a smooth random pair on ``grid``."""
    rng = np.random.default_rng(0)
    from scipy import ndimage

    make = lambda: ndimage.gaussian_filter(rng.random(grid), 2).astype(np.float32)
    moving, fixed = make(), make()
    return time_calls(lambda: ants_syn_field(moving, fixed, spacing, threads), repeats, warmup)
