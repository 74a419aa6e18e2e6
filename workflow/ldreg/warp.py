"""Warping by dense displacement fields in voxel units, composition, and scaling and squaring.

Convention (used everywhere in the project): a field ``u`` of shape (B, 3, D, H, W) maps a
voxel ``x`` of the fixed grid to the point ``x + u(x)`` of the moving image, channel ``i``
being the displacement along tensor dimension ``2 + i``. Warping samples the moving image
there with ``grid_sample`` (align_corners, border padding, so an identity field returns the
input exactly and nothing fades in from outside the volume). This is what MONAI's ``Warp``
does, written out because the warp is on the CPU inference path: building the sampling grid
in place from a cached identity grid takes 0.09 s a 128^3 warp on 2 threads against MONAI's
0.14 s.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_field_batch, check_volume_batch


@functools.lru_cache(maxsize=8)
def _normalised_identity(shape, dtype, device) -> torch.Tensor:
    """Identity grid in grid_sample's [-1, 1] units, channels last and in x, y, z order."""
    grid = identity_grid(shape, device=device, dtype=dtype)
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], dtype=dtype, device=device).view(3, 1, 1, 1)
    return (grid * scale - 1).flip(0).permute(1, 2, 3, 0).unsqueeze(0).contiguous()


def grid_sample_threaded(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``F.grid_sample`` (align_corners) that uses every thread on a single volume: torch's 3D
    CPU kernel parallelises over the batch only, so one volume's output grid is cut into
    slabs along D that run as a batch over the same (not copied) input (the rows left over
    when D is not a multiple of the threads sampled on their own)."""
    slabs = torch.get_num_threads()
    n, depth = grid.shape[0], grid.shape[1]
    sample = lambda img, g: F.grid_sample(img, g, mode=mode, padding_mode=padding_mode, align_corners=True)
    if n != 1 or slabs < 2 or depth < 2 * slabs:
        return sample(image, grid)
    rows = depth // slabs
    even = sample(image.expand(slabs, *image.shape[1:]), grid[0, :rows * slabs].reshape(slabs, rows, *grid.shape[2:]))
    # (slabs, C, rows, H, W) -> (1, C, slabs * rows, H, W)
    even = even.transpose(0, 1).reshape(1, image.shape[1], rows * slabs, *grid.shape[2:4])
    if rows * slabs == depth:
        return even
    return torch.cat([even, sample(image, grid[:, rows * slabs:])], 2)


def _sample(image: torch.Tensor, field: torch.Tensor, mode: str) -> torch.Tensor:
    shape = tuple(image.shape[2:])
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape[::-1]], dtype=field.dtype, device=field.device)
    # (B, 3, D, H, W) voxels -> (B, D, H, W, 3) normalised offsets in x, y, z order, added in place
    grid = field.flip(1).permute(0, 2, 3, 4, 1) * scale
    grid += _normalised_identity(shape, field.dtype, field.device)
    return grid_sample_threaded(image, grid, mode, "border")


def sample_at(volume: torch.Tensor, coords: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample a (C, D, H, W) volume at voxel coordinates (3, d, h, w) of another grid, border
    clamping; (C, d, h, w)."""
    # grid_sample's units (normalising_map) elementwise, left as a channels-last view: a 3x3
    # product over every point cost several times more (0.6 against 0.09 ms at 45x54x45)
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in volume.shape[:0:-1]], dtype=coords.dtype).view(3, 1, 1, 1)
    grid = (coords.flip(0) * scale).sub_(1).permute(1, 2, 3, 0)
    return grid_sample_channels_last(volume, grid, mode)


def _linear_weights(coords: torch.Tensor, size: int) -> torch.Tensor:
    """(len(coords), size) matrix of 1D linear interpolation at ``coords`` (voxels), clamped to
    the border like grid_sample's border padding with align_corners."""
    c = coords.clamp(0, size - 1)
    lo = c.floor().long().clamp(max=max(size - 2, 0))
    frac = c - lo
    weights = torch.zeros(len(coords), size, dtype=coords.dtype)
    rows = torch.arange(len(coords))
    weights[rows, lo] = 1 - frac
    if size > 1:
        weights[rows, lo + 1] += frac
    return weights


def sample_axis_aligned(volume: torch.Tensor, scale, offset, shape) -> torch.Tensor:
    """``volume`` (C, d, h, w) sampled trilinearly (border clamping) at the points
    ``scale * y + offset`` of a grid of ``shape``, each axis of the output mapping to the same
    axis of the volume: what :func:`sample_at` gives for such a map, as three small matrix
    products instead of millions of scattered reads (a 3-channel 48x64x48 field to a 154x188x154
    grid: 0.46 s with grid_sample on 2 threads, a few hundredths of that this way).

    Returns (C, D, H, W) as a view of channels-last memory (D, H, W, C): the full-size result
    comes out of one matrix product in that layout, which is also the one grid_sample's sampling
    grid and the ITK field file use."""
    weights = [_linear_weights(a * torch.arange(n, dtype=volume.dtype) + b, volume.shape[1 + axis])
               for axis, (n, a, b) in enumerate(zip(shape, scale, offset))]
    out = volume.permute(1, 2, 3, 0)  # (d, h, w, C)
    out = torch.einsum("nw,dhwc->dhnc", weights[2], out)
    out = torch.einsum("mh,dhnc->dmnc", weights[1], out)
    depth = out.shape[0]
    out = (weights[0] @ out.reshape(depth, -1)).reshape(shape[0], shape[1], shape[2], volume.shape[0])
    return out.permute(3, 0, 1, 2)


def upsample_linear(volume: torch.Tensor, dims, steps, starts, sizes) -> torch.Tensor:
    """Linear interpolation by whole factors: along each of ``dims`` (in that order) point ``i``
    of ``volume`` becomes point ``i * step`` of a finer axis, with ``step - 1`` points blended
    in between; of that axis, ``sizes`` points from ``starts`` are kept. One blending pass per
    axis over the output (a 3-channel field to a 154x190x160 grid: 32 ms against
    ``F.interpolate``'s 58 ms on 2 threads); the last axis done is cut as a view."""
    out = volume
    for dim, step, start, size in zip(dims, steps, starts, sizes):
        m = out.shape[dim]
        if step > 1 and m > 1:
            shape = list(out.shape)
            shape[dim] = (m - 1) * step + 1
            fine = torch.empty(shape, dtype=out.dtype)
            split = shape[:dim] + [m - 1, step] + shape[dim + 1:]
            frac = (torch.arange(step, dtype=out.dtype) / step).view([step] + [1] * (len(shape) - dim - 1))
            torch.lerp(out.narrow(dim, 0, m - 1).unsqueeze(dim + 1), out.narrow(dim, 1, m - 1).unsqueeze(dim + 1),
                       frac, out=fine.narrow(dim, 0, (m - 1) * step).view(split))
            fine.narrow(dim, (m - 1) * step, 1).copy_(out.narrow(dim, m - 1, 1))
            out = fine
        out = out.narrow(dim, start, size)
    return out


def affine_plus_linear(matrix: np.ndarray, linear: np.ndarray, field_cl: torch.Tensor) -> torch.Tensor:
    """``matrix`` (3x4: ``M y + t``) applied to the voxel coordinates ``y`` of the grid of
    ``field_cl`` (D, H, W, 3), plus ``linear`` (3x3) times the field there: (D, H, W, 3).

    Every map between the grids of a registration is affine, so a sampling grid or a field in
    another frame is this, built from three broadcast axes and one (N, 3) x (3, 3) product
    instead of coordinate maps of the whole grid."""
    dtype = field_cl.dtype
    m = torch.from_numpy(np.asarray(matrix, dtype=np.float64)).to(dtype)
    shape = field_cl.shape[:3]
    out = (field_cl.reshape(-1, 3) @ torch.from_numpy(np.asarray(linear, dtype=np.float64)).to(dtype).T).view(*shape, 3)
    axis = lambda k: torch.arange(shape[k], dtype=dtype)[:, None] * m[:, k]  # (n_k, 3)
    # the first two axes and the offset summed on a small (D, H, 1, 3) array: two full-size passes
    out += axis(0).view(-1, 1, 1, 3) + axis(1).view(1, -1, 1, 3) + m[:, 3]
    out += axis(2).view(1, 1, -1, 3)
    return out


def grid_sample_channels_last(volume: torch.Tensor, coords_cl: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample a (C, D, H, W) volume at voxel coordinates given channels-last (d, h, w, 3) in the
    volume's (D, H, W) axis order, border clamping; (C, d, h, w). ``coords_cl`` must already be
    in grid_sample's units: see :func:`normalising_map`."""
    return grid_sample_threaded(volume[None], coords_cl[None].to(volume.dtype), mode, "border")[0]


def normalising_map(shape) -> np.ndarray:
    """3x4 map from voxel coordinates (D, H, W order) of a volume of ``shape`` to grid_sample's
    align_corners [-1, 1] units in its x, y, z order (the axes reversed)."""
    scale = np.array([2.0 / max(s - 1, 1) for s in shape])
    m = np.zeros((3, 4))
    for k in range(3):
        m[2 - k, k] = scale[k]
    m[:, 3] = -1.0
    return m


def label_sampling_dtype(labels: torch.Tensor) -> torch.dtype:
    """float32 holds integer labels exactly below 2^24 (and samples faster); float64 beyond."""
    if labels.numel() == 0:
        return torch.float32
    low, high = torch.aminmax(labels)  # one pass, multi-threaded (abs().max() makes a copy first)
    return torch.float32 if max(-int(low), int(high)) < 2**24 else torch.float64


def warp_image(image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Trilinear warp of ``image`` (B, C, D, H, W) by ``field`` (B, 3, D, H, W)."""
    check_volume_batch("image", image)
    check_field_batch("field", field, image.shape[2:])
    return _sample(image, field.to(image.dtype), "bilinear")


def warp_labels(labels: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp of an integer label map (B, 1, D, H, W); keeps the dtype and the
    label set (no new values can appear)."""
    if not isinstance(labels, torch.Tensor) or labels.ndim != 5:
        raise ValueError(f"labels: expected a tensor shaped (B, 1, D, H, W), got {getattr(labels, 'shape', type(labels))}")
    check_field_batch("field", field, labels.shape[2:])
    dtype = label_sampling_dtype(labels)
    warped = _sample(labels.to(dtype), field.to(dtype), "nearest")
    return warped.round().to(labels.dtype)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Field equal to warping by ``first`` and then warping the result by ``second``.

    Warping by ``first`` then ``second`` samples the moving image at
    ``x + second(x) + first(x + second(x))``, hence ``second + first o (id + second)``.
    """
    check_field_batch("first", first)
    check_field_batch("second", second, first.shape[2:])
    return second + _sample(first, second.to(first.dtype), "bilinear")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement of the flow of a stationary velocity field (voxels), by scaling and
    squaring; ``-velocity`` gives the inverse. Always a diffeomorphism for smooth input."""
    from monai.networks.blocks import DVF2DDF  # imported here: monai takes ~1.4 s to import, register never needs it

    check_field_batch("velocity", velocity)
    return DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")(velocity)


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates (3, D, H, W) of a grid."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))
