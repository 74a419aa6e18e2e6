"""Per-pair optimisation of a displacement field: the project's warp and losses, Adam on a
residual field kept at a coarser resolution and upsampled (smooth by construction, and a few
times cheaper per step than a full-resolution field).

Goes beyond the paper: used to refine the teacher's cached fields before students learn from
them (``teacher_cache.refine.steps``), by ``register --refine-steps`` and by the accuracy
table's ``optimise<K>`` / ``<model>+refine<K>`` rows. One function for every caller.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .checks import check_field_batch, check_volume_batch
from .losses import similarity_loss, smoothness_loss
from .warp import warp_image

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
