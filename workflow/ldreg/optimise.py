"""Per-pair optimisation of a displacement field: the project's warp and losses, Adam on a
residual field kept at a coarser resolution and upsampled (smooth by construction, and a few
times cheaper per step than a full-resolution field).

Goes beyond the paper: used to refine the teacher's cached fields before students learn from
them (``teacher_cache.refine.steps``), by ``register --refine-steps`` and by the accuracy
table's ``optimise<K>`` / ``<model>+refine<K>`` rows. One function for every caller.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .checks import check_field_batch, check_volume_batch
from .losses import similarity_loss, smoothness_loss
from .warp import warp_image

log = logging.getLogger(__name__)


def optimise_field(moving: torch.Tensor, fixed: torch.Tensor, start: torch.Tensor | None = None, steps: int = 20,
                   lr: float = 0.5, similarity: str = "local_ncc", smoothness_weight: float = 1.0,
                   resolution: float = 0.5, schedule: str = "constant") -> tuple[torch.Tensor, dict]:
    """Refine ``start`` (B, 3, D, H, W; zeros when None) on the pair by ``steps`` Adam steps on
    ``similarity + smoothness_weight * smoothness`` of ``start + upsample(residual)``, the
    residual living on a grid ``resolution`` times the image's. ``schedule`` 'cosine' decays
    the rate to zero over the steps. Returns (field, {'similarity_start', 'similarity_end'});
    zero steps return ``start`` itself, unchanged."""
    check_volume_batch("moving", moving, channels=1)
    check_volume_batch("fixed", fixed, channels=1)
    shape = tuple(moving.shape[2:])
    if start is None:
        start = torch.zeros(moving.shape[0], 3, *shape, dtype=moving.dtype, device=moving.device)
    check_field_batch("start field", start, shape)
    if steps < 0 or not 0 < resolution <= 1 or schedule not in ("constant", "cosine"):
        raise ValueError(f"optimise_field: steps >= 0, 0 < resolution <= 1 and schedule constant|cosine needed; got "
                         f"steps={steps}, resolution={resolution}, schedule={schedule!r}")
    if steps == 0:
        return start, {}
    # inputs made under inference mode (evaluation, register) cannot enter autograd: plain copies
    with torch.inference_mode(False):
        moving, fixed, start = moving.clone(), fixed.clone(), start.detach().clone()
    coarse = tuple(max(2, round(s * resolution)) for s in shape)
    record = {}

    def full_field():  # start + the residual brought to the image grid
        up = residual if coarse == shape else F.interpolate(residual, size=shape, mode="trilinear", align_corners=True)
        return start + up

    with torch.inference_mode(False), torch.enable_grad():
        residual = torch.zeros(moving.shape[0], 3, *coarse, dtype=moving.dtype, device=moving.device,
                               requires_grad=True)
        optimiser = torch.optim.Adam([residual], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps) if schedule == "cosine" else None
        for i in range(steps):
            field = full_field()
            sim = similarity_loss(similarity, warp_image(moving, field), fixed)
            loss = sim + smoothness_weight * smoothness_loss(field)
            if i == 0:
                record["similarity_start"] = float(sim.detach())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if sched is not None:
                sched.step()
    with torch.inference_mode(False), torch.no_grad():
        field = full_field()
        record["similarity_end"] = float(similarity_loss(similarity, warp_image(moving, field), fixed))
    return field.detach(), record
