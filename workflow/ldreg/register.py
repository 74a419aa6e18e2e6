"""Registering NIfTI pairs with a trained model on the CPU: the ``register`` command's path,
split into the stages that the speed profile times one by one.

A :class:`Registrar` loads the model once and then, per pair: ``prepare`` (read, check and
preprocess each image), ``predict`` (the network's composed field on the preprocessed grid),
``warp`` (the field mapped back to the fixed image's own grid; the moving image and labels
warped) and :func:`write_outputs`. In memory the field is (3, D, H, W) in voxels of the fixed
image: fixed voxel ``y`` corresponds to the moving image's point at fixed-voxel coordinates
``y + u(y)``. It is written as ITK-based tools read a displacement field (physical mm, LPS
axes, 5D vector NIfTI: :func:`ldreg.io.field_to_itk_array`), or on request in fixed voxels.
Where an image already lies on the model's grid (the common case for preprocessed data) the
maps between grids are identities and are skipped.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .preprocessing import Preprocessing, grid_at_spacing, mask_bounds, preprocess_array
from .io import InputError, field_to_itk_array, field_to_voxel_array, load_volume, save_volume
from .modelfile import load_model
from .networks import prepare_for_inference
from .optimise import ncc_descent
from .lattice_warp import load_kernels, warp_through_lattice
from .warp import (affine_plus_linear, grid_sample_channels_last, identity_grid, label_sampling_dtype, normalising_map,
                   sample_at, sample_axis_aligned, upsample_linear, warp_image, warp_labels)


@dataclass
class Prepared:
    """One input image: as read (``raw`` on ``img``'s grid) and preprocessed (``image`` on
    the grid of ``affine``)."""

    path: str
    raw: np.ndarray
    img: nib.Nifti1Image
    image: np.ndarray
    affine: np.ndarray


def _is_identity(matrix: np.ndarray) -> bool:
    return np.allclose(matrix, np.eye(4), atol=1e-5)


def _is_diagonal(matrix: np.ndarray) -> bool:
    return np.allclose(matrix - np.diag(np.diag(matrix)), 0, atol=1e-6)


def _apply(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """A 4x4 voxel map applied to coordinates (3, ...)."""
    m = torch.from_numpy(matrix).to(points.dtype)
    return torch.einsum("ij,j...->i...", m[:3, :3], points) + m[:3, 3].view(3, *[1] * (points.ndim - 1))


@dataclass
class PairInput:
    """A pair read and preprocessed (``seconds`` it took), ready for the network."""

    moving: Prepared
    fixed: Prepared
    labels: "Labels | None"
    seconds: float


@dataclass
class Labels:
    """A moving label map ready for the registrar's warp (the compiled one: int32 as read; torch's:
    a float tensor, exact below 2^24, float64 beyond) and the integer type its file stores."""

    data: "np.ndarray | torch.Tensor"
    stored_dtype: np.dtype


@dataclass
class Residual:
    """What refinement on the scan adds to the network's map: a displacement (3, D, H, W) in mm
    along the RAS axes, on the grid of ``affine`` (the fixed image's field of view)."""

    field_mm: torch.Tensor
    affine: np.ndarray


def _scan_tensor(prepared: Prepared) -> torch.Tensor:
    """The scan as read, scaled so that its 99th percentile is 1 (a strided sample gives the
    percentile: the local NCC needs only a stable scale), (1, 1, D, H, W)."""
    raw = prepared.raw
    step = max(1, round((raw.size / 2e5) ** (1 / 3)))
    scale = float(np.percentile(raw[::step, ::step, ::step], 99)) or 1.0
    return torch.from_numpy(raw)[None, None] / scale


def _level_image(scan: torch.Tensor, scan_affine: np.ndarray, shape, affine: np.ndarray, spacing: float) -> torch.Tensor:
    """The scan averaged over blocks of about the level's spacing (against aliasing; a block
    mean costs a hundredth of a Gaussian at full resolution) and resampled onto the level grid
    (1, 1, *shape)."""
    voxel = np.linalg.norm(scan_affine[:3, :3], axis=0)
    block = tuple(max(1, int(np.floor(spacing / v + 1e-3))) for v in voxel)
    smooth, scan_affine = scan, np.asarray(scan_affine, dtype=np.float64)
    if max(block) > 1:
        smooth = F.avg_pool3d(scan, block, block, ceil_mode=True, count_include_pad=False)
        # block k's centre lies at scan voxel k * block + (block - 1) / 2
        pooled = np.diag(list(block) + [1.0])
        pooled[:3, 3] = (np.array(block) - 1) / 2
        scan_affine = scan_affine @ pooled
    to_scan = np.linalg.inv(scan_affine) @ affine
    if _is_diagonal(to_scan[:3, :3]):
        out = sample_axis_aligned(smooth[0], np.diag(to_scan)[:3], to_scan[:3, 3], shape)
    else:
        out = sample_at(smooth[0], _apply(to_scan, identity_grid(shape)), "bilinear")
    return out.contiguous()[None]


@dataclass
class _Lattice:
    """Points every ``step`` voxels of a fixed grid of ``shape`` (an integer step; the first at
    voxel ``-crop``), reaching past its last voxel: trilinear upsampling from them (align_corners)
    lands on every voxel once the ``crop`` is cut off."""

    shape: tuple
    affine: np.ndarray  # lattice index -> fixed voxel (diagonal)
    crop: tuple


def _lattice(fixed_shape, fixed_affine: np.ndarray, source_affine: np.ndarray) -> _Lattice:
    """The lattice at the source grid's spacing (rounded down to whole fixed voxels) and, where
    the source's points fall on fixed voxels, on them: its values are then the source's own,
    and upsampling interpolates once, as sampling the source at every voxel would."""
    to_fixed = np.linalg.inv(fixed_affine) @ source_affine
    ratio = np.abs(np.diag(to_fixed)[:3]) if _is_diagonal(to_fixed[:3, :3]) else None
    if ratio is None:  # an oblique source: its spacing, in fixed voxels, along the coarsest axis
        ratio = np.full(3, np.linalg.norm(source_affine[:3, :3], axis=0).min()
                        / np.linalg.norm(fixed_affine[:3, :3], axis=0).max())
    step = np.maximum(1, np.floor(ratio + 1e-6)).astype(int)
    aligned = np.isclose(ratio, step) & np.isclose(to_fixed[:3, 3], np.round(to_fixed[:3, 3]))
    first = np.where(aligned, np.mod(np.round(to_fixed[:3, 3]), step), 0).astype(int)  # first point at or after voxel 0
    first = np.where(first > 0, first - step, first)  # ... moved to or before it
    shape = tuple(int(np.ceil((n - 1 - o) / s)) + 1 for n, o, s in zip(fixed_shape, first, step))
    affine = np.diag(list(step.astype(float)) + [1.0])
    affine[:3, 3] = first
    return _Lattice(shape, affine, tuple(int(-o) for o in first))


def _sample_map(field: torch.Tensor, to_field: np.ndarray, shape) -> torch.Tensor:
    """A (3, d, h, w) field sampled trilinearly at the points ``to_field`` maps a grid of
    ``shape`` to: (*shape, 3), channels last."""
    if _is_diagonal(to_field[:3, :3]):
        out = sample_axis_aligned(field, np.diag(to_field)[:3], to_field[:3, 3], shape)
    else:
        out = sample_at(field, _apply(to_field, identity_grid(shape)), "bilinear")
    return out.permute(1, 2, 3, 0).contiguous()


def _upsample(lattice_cl: torch.Tensor, lattice: _Lattice, fixed_shape, reverse: bool = False) -> torch.Tensor:
    """(d, h, w, C) values on ``lattice`` -> at every voxel of the fixed grid: (D, H, W, C)
    contiguous, or with ``reverse`` (C, D, H, W) laid out in memory as (C, W, H, D) (NIfTI's
    order)."""
    values = lattice_cl.permute(3, 2, 1, 0) if reverse else lattice_cl
    dims = (1, 2, 3) if reverse else (2, 1, 0)  # the outermost axis last: its cut keeps the memory contiguous
    axes = (2, 1, 0)  # the fixed axis each of those dims holds
    steps = np.diag(lattice.affine)[:3].astype(int)
    out = upsample_linear(values, dims, [steps[a] for a in axes], [lattice.crop[a] for a in axes],
                          [fixed_shape[a] for a in axes])
    return out.permute(0, 3, 2, 1) if reverse else out


class Registrar:
    """A model loaded for registering pairs. ``precision`` and ``channels_last`` choose how the
    convolutions run (see :func:`ldreg.networks.prepare_for_inference`); ``grid`` overrides the
    model's preprocessed grid (the networks are fully convolutional: any size divisible by
    2^depth). ``compiled_warp`` warps image and labels through :mod:`ldreg.lattice_warp`'s
    compiled kernels (image, labels and field: 0.05 s a 1 mm pair against torch's 0.12, for
    ~0.5 s once a process to load them): for processes that register many pairs
    (:func:`ldreg.batch.register_batch` switches it on by itself)."""

    def __init__(self, model_path, device: str = "cpu", precision: str = "float32", channels_last: bool = False,
                 grid=None, refine_levels=(), refine_options: dict | None = None, upto: int | None = None,
                 compiled_warp: bool = False):
        self.refine_levels = tuple((float(s), int(k)) for s, k in refine_levels)
        if any(s <= 0 or k < 0 for s, k in self.refine_levels):
            raise ValueError(f"refine_levels: (spacing_mm > 0, iterations >= 0) pairs needed, got {refine_levels}")
        self.refine_options = dict(refine_options or {})  # ncc_descent's options
        self.upto = upto  # the stages run (0: the affine stage alone); None: all of them
        self.model_path = str(model_path)
        self.model, prep, self.payload = load_model(model_path, device)
        self.prep: Preprocessing = dataclasses.replace(prep, grid=tuple(grid)) if grid else prep
        self.device = device
        prepare_for_inference(self.model, precision, channels_last)
        self.compiled_warp = False
        if compiled_warp:
            self.use_compiled_warp()

    def use_compiled_warp(self) -> None:
        """From now on warp through the compiled kernels, loaded here (before any pair is read: labels
        are read for the warp that will use them), not in the first pair's timed warp: loading them
        beside the first pair's reading and network slowed those by as much (it holds the GIL)."""
        load_kernels()
        self.compiled_warp = True

    def prepare(self, path) -> Prepared:
        raw, img = load_volume(path, "image")
        image, affine = preprocess_array(raw, img, self.prep)
        return Prepared(str(path), raw, img, image, affine)

    @torch.inference_mode()
    def predict(self, moving: Prepared, fixed: Prepared) -> torch.Tensor:
        """The composed field (3, D, H, W), float32, in voxels of the preprocessed grid."""
        as_batch = lambda a: torch.from_numpy(a)[None, None].to(self.device)
        stages = {} if self.upto is None else {"upto": self.upto}
        flow = self.model(as_batch(moving.image), as_batch(fixed.image), warp=False, **stages)["flow"]
        return flow[0].float().cpu()

    @torch.inference_mode()
    def refine_on_scan(self, flow: torch.Tensor, moving: Prepared, fixed: Prepared, levels) -> tuple[Residual, dict]:
        """Greedy-style refinement of the network's map on the pair's own images, coarse to fine:
        ``levels`` ((spacing_mm, iterations), ...) from coarse to fine (:func:`ldreg.optimise.ncc_descent`).
        Returns the residual (mm, RAS, on the finest level's grid) and each level's seconds."""
        times, residual, grid = {}, None, None
        fixed_scan, moving_scan = _scan_tensor(fixed), _scan_tensor(moving)
        # the fixed scan's foreground: above a tenth of its 99th percentile (where the scaled scan is 1)
        box = mask_bounds((fixed_scan[0, 0] > 0.1).numpy())
        for spacing, iterations in levels:
            t = time.perf_counter()
            # the level's grid covers the fixed image's foreground (and a margin for the windows)
            shape, affine = grid_at_spacing(fixed.img, spacing, box, margin_mm=3 * spacing)
            fixed_level = _level_image(fixed_scan, fixed.img.affine, shape, affine, spacing)
            moving_shape, moving_affine = grid_at_spacing(moving.img, spacing)
            # the image alone: the composed steps use the warped image's gradient
            moving_stack = _level_image(moving_scan, moving.img.affine, moving_shape, moving_affine, spacing)
            # the start map: level voxel z -> fixed preprocessed voxel p -> p + u(p) -> moving level voxel
            to_pre = np.linalg.inv(fixed.affine) @ affine
            flow_cl = _sample_map(flow, to_pre, shape)
            pre_to_level = np.linalg.inv(moving_affine) @ moving.affine
            base = affine_plus_linear((pre_to_level @ to_pre)[:3], pre_to_level[:3, :3], flow_cl)
            base = base.permute(3, 0, 1, 2).contiguous()
            if residual is None:
                residual = torch.zeros_like(base)
            else:  # the coarser level's residual on this grid, in this level's voxels
                to_coarse = np.linalg.inv(grid) @ affine
                residual = sample_axis_aligned(residual, np.diag(to_coarse)[:3], to_coarse[:3, 3], shape)
                residual = residual.contiguous() / float(to_coarse[0, 0])
            residual, _ = ncc_descent(moving_stack, fixed_level, base, residual, iterations, **self.refine_options)
            grid = affine
            times[f"refine_{spacing:g}mm"] = time.perf_counter() - t
        return Residual(residual * float(grid[0, 0]), grid), times

    def read_labels(self, path, moving: Prepared) -> Labels:
        """The moving image's label map, checked to lie on its grid."""
        data, img = load_volume(path, "labels")
        if data.shape != moving.raw.shape or not np.allclose(img.affine, moving.img.affine, atol=1e-3):
            raise InputError(f"{path}: label map is not on the grid of {moving.path}")
        if not self.compiled_warp:
            data = torch.from_numpy(data)
            data = data.to(label_sampling_dtype(data))
        return Labels(data, img.get_data_dtype())

    @torch.inference_mode()
    def warp(self, flow: torch.Tensor, moving: Prepared, fixed: Prepared, moving_labels: Labels | None = None,
             residual: Residual | None = None) -> dict:
        """Warped moving image (and labels) and the field, all on the fixed image's own grid;
        ``residual`` (from :meth:`refine_on_scan`) is added to the network's map."""
        labels = None if moving_labels is None else moving_labels.data
        fixed_shape = tuple(fixed.raw.shape)
        fixed_to_pre = np.linalg.inv(fixed.affine) @ fixed.img.affine  # fixed voxel -> preprocessed voxel
        pre_to_moving = np.linalg.inv(moving.img.affine) @ moving.affine  # preprocessed -> moving voxel
        pre_to_fixed = np.linalg.inv(fixed.img.affine) @ moving.affine  # moving preprocessed -> fixed voxel
        if (residual is None and _is_identity(fixed_to_pre) and _is_identity(pre_to_moving) and _is_identity(pre_to_fixed)
                and fixed_shape == tuple(flow.shape[1:]) == tuple(moving.raw.shape)):
            # both images on the model's grid: the network's field is the answer as it is
            warped = warp_image(torch.from_numpy(moving.raw)[None, None], flow[None])[0, 0].numpy()
            warped_labels = None if labels is None else warp_labels(torch.as_tensor(labels)[None, None], flow[None])[0, 0].numpy()
            field = flow
        else:
            # the maps are built on a lattice over the fixed grid as fine as the finest source field
            # (the residual's level, else the network's grid) and upsampled once, trilinearly: what
            # interpolating each source to every voxel gives, at a fraction of the full-size passes
            source = residual.affine if residual is not None else fixed.affine
            lattice = _lattice(fixed_shape, fixed.img.affine, source)
            flow_cl = _sample_map(flow, fixed_to_pre @ lattice.affine, lattice.shape)
            if residual is not None:  # mm on its grid -> moving preprocessed voxels at the lattice points
                to_pre_units = torch.from_numpy(np.linalg.inv(moving.affine[:3, :3]).astype(np.float32))
                res_cl = _sample_map(residual.field_mm, np.linalg.inv(residual.affine) @ fixed.img.affine @ lattice.affine,
                                     lattice.shape)
                flow_cl = flow_cl + (res_cl.reshape(-1, 3) @ to_pre_units.T).view(flow_cl.shape)
            # lattice point i -> fixed voxel y = L i -> the moving preprocessed voxel fixed_to_pre(y) + u ->
            # the moving image's voxel (for torch's grid_sample in its units) and the fixed image's
            # own voxel: both affine in i plus a 3x3 matrix times u
            to_moving = pre_to_moving if self.compiled_warp else np.vstack([normalising_map(moving.raw.shape), [0, 0, 0, 1]]) @ pre_to_moving
            sampling = affine_plus_linear((to_moving @ fixed_to_pre @ lattice.affine)[:3], to_moving[:3, :3], flow_cl)
            to_fixed = (pre_to_fixed @ fixed_to_pre @ lattice.affine)[:3] - lattice.affine[:3]
            field_cl = affine_plus_linear(to_fixed, pre_to_fixed[:3, :3], flow_cl)
            if self.compiled_warp:  # image, labels and the field from the lattice in one compiled pass
                warped, warped_labels, field = warp_through_lattice(
                    sampling.numpy(), np.diag(lattice.affine)[:3], lattice.crop, fixed_shape, moving.raw, labels,
                    torch.get_num_threads(), field=field_cl.numpy())
                field = torch.from_numpy(field)
            else:  # the maps upsampled to every voxel (the field with its axes reversed in memory:
                # Fortran order, as the files want it), then torch's grid_sample for each volume
                field = _upsample(field_cl, lattice, fixed_shape, reverse=True)
                sampling = _upsample(sampling, lattice, fixed_shape)
                warped = grid_sample_channels_last(torch.from_numpy(moving.raw)[None], sampling, "bilinear")[0].numpy()
                warped_labels = None
                if labels is not None:
                    warped_labels = grid_sample_channels_last(labels[None], sampling, "nearest")[0].round().numpy()
        if warped_labels is not None:  # the label file's own integer type (float-stored labels: int32)
            stored = moving_labels.stored_dtype
            warped_labels = warped_labels.astype(stored if np.issubdtype(stored, np.integer) else np.int32, copy=False)
        # the field may be a (3, D, H, W) view of (3, W, H, D) memory: the layout the files want
        return {"warped": warped, "field": field.numpy(), "warped_labels": warped_labels, "fixed_img": fixed.img}

    def read_pair(self, moving_path, fixed_path, moving_labels_path=None) -> PairInput:
        """Read, check and preprocess a pair (and the moving labels), the files side by side:
        reading (gzip) and the percentile sort are single-threaded."""
        t = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            pending = pool.submit(self.prepare, moving_path)
            fixed_read = pool.submit(self.prepare, fixed_path)
            moving = pending.result()
            labels = pool.submit(self.read_labels, moving_labels_path, moving) if moving_labels_path else None
            fixed = fixed_read.result()
            labels = labels.result() if labels else None
        return PairInput(moving, fixed, labels, time.perf_counter() - t)

    def register_read(self, pair: PairInput) -> dict:
        """The network, the refinement and the warp for a pair read by :meth:`read_pair`;
        ``times`` holds each stage's seconds (reading and preprocessing as ``preprocess``)."""
        times = {"preprocess": pair.seconds}
        t = time.perf_counter()
        flow = self.predict(pair.moving, pair.fixed)
        times["network"] = time.perf_counter() - t
        residual = None
        if self.refine_levels:
            residual, level_times = self.refine_on_scan(flow, pair.moving, pair.fixed, self.refine_levels)
            times.update(level_times)
        t = time.perf_counter()
        result = self.warp(flow, pair.moving, pair.fixed, pair.labels, residual)
        times["warp"] = time.perf_counter() - t
        result["times"] = times
        return result

    def register(self, moving_path, fixed_path, moving_labels_path=None) -> dict:
        """All stages for one pair; ``times`` holds each stage's seconds."""
        return self.register_read(self.read_pair(moving_path, fixed_path, moving_labels_path))


def write_outputs(result: dict, warped_path, field_path=None, warped_labels_path=None,
                  field_in_fixed_voxels: bool = False) -> None:
    """Write what was asked for, each with the fixed image's affine and header. The field is
    written for ITK-based tools (mm, LPS, (D, H, W, 1, 3)) unless ``field_in_fixed_voxels``."""
    fixed_img = result["fixed_img"]
    jobs = [(warped_path, result["warped"], np.float32)]
    if field_path:
        field = (field_to_voxel_array(result["field"]) if field_in_fixed_voxels
                 else field_to_itk_array(result["field"], fixed_img.affine))
        jobs.append((field_path, field, None))
    if warped_labels_path:
        jobs.append((warped_labels_path, result["warped_labels"], None))
    # side by side: file writing and gzip release the GIL
    with ThreadPoolExecutor(len(jobs)) as pool:
        for done in [pool.submit(save_volume, path, data, fixed_img.affine, fixed_img.header, dtype)
                     for path, data, dtype in jobs]:
            done.result()
