"""Per-pair optimisation of a displacement field: the project's warp and losses, Adam on a
residual field kept at a coarser resolution and upsampled (smooth by construction, and a few
times cheaper per step than a full-resolution field).

Goes beyond the paper: used to refine the teacher's cached fields before students learn from
them (``teacher_cache.refine.steps``), by ``register --refine-steps`` and by the accuracy
table's ``optimise<K>`` / ``<model>+refine<K>`` rows. One function for every caller.
"""
from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F

from .checks import check_field_batch, check_volume_batch
from .defaults import REFINE_SPACINGS, REFINE_STEPS
from .methods import check_steps_per_level, format_refine_steps
from .warp import identity_grid, sample_at, warp_image

log = logging.getLogger(__name__)


def optimise_field(moving: torch.Tensor, fixed: torch.Tensor, start: torch.Tensor | None = None, steps: int = 20,
                   lr: float = 1.0, similarity: str = "local_ncc", smoothness_weight: float = 1.0,
                   resolution: float = 0.25, schedule: str = "constant",
                   coarse_fraction: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Refine ``start`` (B, 3, D, H, W; zeros when None) on the pair by ``steps`` Adam steps on
    ``similarity + smoothness_weight * smoothness`` of ``start + upsample(residual)``, the
    residual living on a grid ``resolution`` times the image's. ``schedule`` 'cosine' decays
    the rate to zero over the steps. The defaults (lr 1, a quarter-resolution residual) are the
    best measured on the default cohort (docs/experiments.md: 10 steps from zero, Dice 0.460
    against 0.384 at lr 0.5 and half resolution). ``coarse_fraction`` of the steps (the first ones) run on
    the images and field at half resolution, where a step costs about an eighth (coarse to
    fine: the large displacements first). Returns (field, {'similarity_start',
    'similarity_end'}, both at full resolution); zero steps return ``start`` itself."""
    from .losses import similarity_loss, smoothness_loss  # here: monai's import (~1.4 s) is not on register's path
    check_volume_batch("moving", moving, channels=1)
    check_volume_batch("fixed", fixed, channels=1)
    shape = tuple(moving.shape[2:])
    if start is None:
        start = torch.zeros(moving.shape[0], 3, *shape, dtype=moving.dtype, device=moving.device)
    check_field_batch("start field", start, shape)
    if (steps < 0 or not 0 < resolution <= 1 or schedule not in ("constant", "cosine")
            or not 0 <= coarse_fraction <= 1):
        raise ValueError(f"optimise_field: steps >= 0, 0 < resolution <= 1, schedule constant|cosine and "
                         f"0 <= coarse_fraction <= 1 needed; got steps={steps}, resolution={resolution}, "
                         f"schedule={schedule!r}, coarse_fraction={coarse_fraction}")
    if steps == 0:
        return start, {}
    # inputs made under inference mode (evaluation, register) cannot enter autograd: plain copies
    with torch.inference_mode(False):
        moving, fixed, start = moving.clone(), fixed.clone(), start.detach().clone()
    coarse = tuple(max(2, round(s * resolution)) for s in shape)
    record = {}
    half = tuple(max(2, s // 2) for s in shape)
    with torch.inference_mode(False):
        if coarse_fraction > 0:  # the pair and the start field at half resolution
            pool = lambda v: F.interpolate(v, size=half, mode="trilinear", align_corners=True)
            moving_half, fixed_half = pool(moving), pool(fixed)
            to_half = _voxel_ratio(half, shape, start)
            start_half = pool(start) * to_half
            with torch.no_grad():  # at full resolution, like the end (otherwise the first step's)
                record["similarity_start"] = float(similarity_loss(similarity, warp_image(moving, start), fixed))

    def full_field():  # start + the residual brought to the image grid
        up = residual if coarse == shape else F.interpolate(residual, size=shape, mode="trilinear", align_corners=True)
        return start + up

    def half_field():  # the same field on the half-resolution grid, in its voxels
        up = F.interpolate(residual, size=half, mode="trilinear", align_corners=True)
        return start_half + up * to_half

    coarse_steps = round(coarse_fraction * steps)
    with torch.inference_mode(False), torch.enable_grad():
        residual = torch.zeros(moving.shape[0], 3, *coarse, dtype=moving.dtype, device=moving.device,
                               requires_grad=True)
        adam = _Adam(residual)
        for i in range(steps):
            if i < coarse_steps:
                field = half_field()
                sim = similarity_loss(similarity, warp_image(moving_half, field), fixed_half)
            else:
                field = full_field()
                sim = similarity_loss(similarity, warp_image(moving, field), fixed)
            loss = sim + smoothness_weight * smoothness_loss(field)
            if i == 0 and not coarse_steps:
                record["similarity_start"] = float(sim.detach())
            (grad,) = torch.autograd.grad(loss, residual)
            rate = lr * (0.5 * (1 + math.cos(math.pi * i / steps)) if schedule == "cosine" else 1.0)
            adam.step(grad, rate)
    with torch.inference_mode(False), torch.no_grad():
        field = full_field()
        record["similarity_end"] = float(similarity_loss(similarity, warp_image(moving, field), fixed))
    return field.detach(), record


def _voxel_ratio(target, source, like: torch.Tensor) -> torch.Tensor:
    """Per-channel factor taking displacements in ``source``-grid voxels to ``target``-grid
    voxels (align_corners: the end voxels coincide)."""
    ratio = [(t - 1) / max(s - 1, 1) for t, s in zip(target, source)]
    return torch.tensor(ratio, dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)


class _Adam:
    """Adam (Kingma & Ba; torch.optim.Adam's defaults: betas 0.9/0.999, eps 1e-8) on one tensor.
    Written out because constructing torch.optim.Adam in a fresh process costs ~1.4 s of lazy
    imports, more than the five refinement steps `register --refine-steps 5` runs; the update is
    the same (tests/test_optimise.py compares them)."""

    def __init__(self, param: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.betas, self.eps, self.t = param, betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self, grad: torch.Tensor, lr: float) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v / (1 - b2**self.t)).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-lr / (1 - b1**self.t))


# ------------------------------------------------------------------------------------------
# Refinement on the pair's own images, coarse to fine (what `register --refine-steps` runs).
# Greedy's scheme (Yushkevich et al.), written for torch on the CPU, no autograd: the local
# NCC's gradient in closed form from box filters, the update smoothed by a Gaussian, scaled to a
# fixed largest step and composed with the whole map, which is smoothed in turn. The network's
# map is the start; the refinement lives on grids over the fixed image's foreground at the
# level's spacing, and the moving image is sampled at the refined map.


@functools.lru_cache(maxsize=64)
def _inside_weight(n: int, taps: tuple, dtype: torch.dtype) -> torch.Tensor:
    """(n,) sum of the taps that fall inside an axis of length ``n`` at each position."""
    return _filter_axis(torch.ones(n, dtype=torch.float64), 0, taps).to(dtype)


def _filter_axis(volume: torch.Tensor, dim: int, taps: tuple) -> torch.Tensor:
    """A centred 1D filter along ``dim``, zeros outside: one shifted multiply-add per tap."""
    radius, n = len(taps) // 2, volume.shape[dim]
    out = volume * taps[radius]
    for t in range(1, min(radius, n - 1) + 1):
        out.narrow(dim, t, n - t).add_(volume.narrow(dim, 0, n - t), alpha=taps[radius - t])
        out.narrow(dim, 0, n - t).add_(volume.narrow(dim, t, n - t), alpha=taps[radius + t])
    return out


def separable_filter(volume: torch.Tensor, taps: tuple, renormalise: bool = False) -> torch.Tensor:
    """(1, C, D, H, W) filtered by the same centred 1D filter along each axis, zeros outside;
    ``renormalise``: divided by the taps' sum inside, so that near the ends the filter averages
    what lies inside instead of pulling towards zero. Shifted multiply-adds over whole slabs:
    on the CPU twice as fast as products with banded matrices and many times faster than a
    depthwise conv3d (77x95x80 volumes, 2 threads; docs/performance.md)."""
    out = volume
    for dim in (2, 3, 4):
        out = _filter_axis(out, dim, taps)
        if renormalise:
            shape = [1] * 5
            shape[dim] = out.shape[dim]
            out /= _inside_weight(out.shape[dim], taps, out.dtype).view(shape)
    return out


def box_mean(volume: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2 radius + 1)^3 window around each voxel of (1, C, D, H, W), zeros outside."""
    k = 2 * radius + 1
    return separable_filter(volume, (1.0 / k,) * k)


def gaussian_smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """(1, C, D, H, W) smoothed by a Gaussian of ``sigma`` voxels (truncated at 3 sigma,
    renormalised at the ends: a constant field stays constant)."""
    if sigma <= 0:
        return volume
    radius = max(1, math.ceil(3 * sigma))
    taps = [math.exp(-t * t / (2 * sigma * sigma)) for t in range(-radius, radius + 1)]
    return separable_filter(volume, tuple(t / sum(taps) for t in taps), renormalise=True)


def fixed_window_stats(fixed: torch.Tensor, radius: int, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed image's local means and variances (+ ``eps``) over the windows of
    :func:`ncc_gradient`: the same at every iteration of a level, so computed once."""
    mean_i, mean_ii = box_mean(torch.cat([fixed, fixed * fixed], 1), radius)[0]
    return mean_i, (mean_ii - mean_i * mean_i).clamp_min(0) + eps


def ncc_gradient(fixed: torch.Tensor, warped: torch.Tensor, radius: int, eps: float = 1e-5,
                 fixed_stats: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The derivative of the mean local squared NCC (window (2 radius + 1)^3) with respect to
    each voxel of ``warped`` (1, 1, D, H, W), exact over the overlapping windows: for a window
    with covariance A and variances B (fixed), C (warped), d(A^2 / BC)/dJ(y) = alpha (I(y) - mean I)
    - beta (J(y) - mean J) with alpha = 2A / BC, beta = 2A^2 / BC^2, summed over the windows that
    hold y (three more box filters). ``fixed_stats``: :func:`fixed_window_stats` of ``fixed``
    (the same ``radius`` and ``eps``), if already at hand. Returns (gradient (D, H, W), mean NCC^2)."""
    mean_i, var_i = fixed_stats if fixed_stats is not None else fixed_window_stats(fixed, radius, eps)
    mean_j, mean_jj, mean_ij = box_mean(torch.cat([warped, warped * warped, fixed * warped], 1), radius)[0]
    cov = mean_ij - mean_i * mean_j
    var_j = (mean_jj - mean_j * mean_j).clamp_min(0) + eps
    alpha = 2 * cov / (var_i * var_j)
    beta = alpha * cov / var_j
    sums = box_mean(torch.stack([alpha, beta, alpha * mean_i - beta * mean_j])[None], radius)[0]
    gradient = fixed[0, 0] * sums[0] - warped[0, 0] * sums[1] - sums[2]
    return gradient, float((cov * cov / (var_i * var_j)).mean())


def spatial_gradient(volume: torch.Tensor) -> torch.Tensor:
    """Central differences (one-sided at the borders) of (1, 1, D, H, W): (1, 3, D, H, W)."""
    return torch.stack(torch.gradient(volume[0, 0]))[None]


def ncc_descent(moving: torch.Tensor, fixed: torch.Tensor, base: torch.Tensor, residual: torch.Tensor,
                iterations: int, radius: int = 2, step: float = 1.0, sigma_update: float = math.sqrt(3),
                sigma_field: float = math.sqrt(0.5), compose: bool = True) -> tuple[torch.Tensor, dict]:
    """``iterations`` Greedy-style steps at one level. ``moving`` (1, 4, ...): the moving image
    and its spatial gradient on its own grid (or (1, 1, ...), the image alone: the warped
    image's gradient is used); ``fixed`` (1, 1, D, H, W); ``base`` (3, D, H, W):
    the moving grid's voxel coordinates of each fixed voxel under the start map; ``residual``
    (3, D, H, W) in voxels of either grid (same spacing and axes), updated and returned with
    {'ncc_start', 'ncc_end'} (mean local NCC^2 before the first and the last step). Each step
    (largest length ``step`` voxels) is added to the residual, or with ``compose`` composed
    with the whole map as Greedy does (``map <- map o (id + step)``; the network's part is then
    resampled and smoothed with it too)."""
    record = {}
    fixed_stats = fixed_window_stats(fixed, radius)
    if compose:  # the whole map as a displacement on this grid, the network's part included
        grid = identity_grid(base.shape[1:], dtype=base.dtype)
        start = base - grid
        total = start + residual
    for i in range(iterations):
        coords = grid + total if compose else base + residual
        sampled = sample_at(moving[0], coords, "bilinear")[None]
        warped = sampled[:, :1]
        # the moving image's gradient where it is sampled, or (one channel given) the warped
        # image's own: the derivative a composed step needs, for a quarter of the sampling
        moving_gradient = sampled[0, 1:] if moving.shape[1] > 1 else spatial_gradient(warped)[0]
        d_warped, ncc = ncc_gradient(fixed, warped, radius, fixed_stats=fixed_stats)
        if i == 0:
            record["ncc_start"] = ncc
        update = gaussian_smooth((d_warped * moving_gradient)[None], sigma_update)[0]
        # the largest step's length: a sum of squares (a norm over dim 0 is a strided
        # reduction, ten times slower here)
        largest = math.sqrt(float((update[0] * update[0] + update[1] * update[1] + update[2] * update[2]).max()))
        update = update * (step / largest) if largest > 0 else update
        if compose:
            total = update + sample_at(total, grid + update, "bilinear")
            total = gaussian_smooth(total[None], sigma_field)[0]
        else:
            residual = gaussian_smooth((residual + update)[None], sigma_field)[0]
        record["ncc_end"] = ncc
    return (total - start if compose else residual), record


def refine_schedule(steps=None, spacings=REFINE_SPACINGS) -> tuple[tuple[float, int], ...]:
    """((spacing_mm, iterations), ...): ``steps`` an int K: K at the first (coarsest) spacing,
    half as many (at least one) at each finer one; a tuple: each spacing's own iterations
    (a level of zero is left out, as in Greedy's ``-n 10x5x0``); zero steps: no refinement;
    None: register's default (:data:`ldreg.defaults.REFINE_STEPS`, for the default levels)."""
    spacings = [float(s) for s in spacings]
    if any(s <= 0 for s in spacings) or spacings != sorted(spacings, reverse=True):
        raise ValueError(f"refinement spacings must be positive and coarse to fine, got {spacings}")
    if steps is None:
        if len(spacings) != len(REFINE_SPACINGS):
            raise ValueError(f"the default refinement steps ({format_refine_steps(REFINE_STEPS)}) are for "
                             f"{len(REFINE_SPACINGS)} levels; with the levels {', '.join(f'{s:g}' for s in spacings)} mm "
                             "give the steps too (K, or one count per level)")
        steps = REFINE_STEPS
    if isinstance(steps, tuple):
        check_steps_per_level(steps, spacings)
        return tuple((s, k) for s, k in zip(spacings, steps) if k)
    if steps < 0:
        raise ValueError(f"refinement steps must be >= 0, got {steps}")
    if not steps:
        return ()
    return tuple((s, max(1, round(steps / 2**i))) for i, s in enumerate(spacings))


def refine_on_grid(moving: torch.Tensor, fixed: torch.Tensor, flow: torch.Tensor, iterations: int,
                   **options) -> torch.Tensor:
    """:func:`ncc_descent` on images that share one grid (the model's): ``flow`` (1, 3, ...)
    plus the residual it finds, (1, 3, ...)."""
    if not iterations:
        return flow
    grid = identity_grid(fixed.shape[2:], dtype=flow.dtype)
    residual, _ = ncc_descent(moving, fixed, grid + flow[0], torch.zeros_like(flow[0]), iterations, **options)
    return flow + residual[None]
