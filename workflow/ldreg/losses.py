"""Training losses. Local NCC and the squared-gradient smoothness come from MONAI; the global
correlation, affine regularisers, distillation and WGAN-GP terms are the method's own."""
from __future__ import annotations

import torch
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from .checks import check_field_batch, check_volume_batch

_diffusion = DiffusionLoss()


def correlation_loss(warped: torch.Tensor, fixed: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - Pearson correlation over each volume, averaged over the batch (0 for a perfect match)."""
    check_volume_batch("warped", warped)
    check_volume_batch("fixed", fixed)
    if warped.shape != fixed.shape:
        raise ValueError(f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} must have one shape")
    a = warped.flatten(1) - warped.flatten(1).mean(1, keepdim=True)
    b = fixed.flatten(1) - fixed.flatten(1).mean(1, keepdim=True)
    corr = (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + eps)
    return (1 - corr).mean()


def local_ncc_loss(warped: torch.Tensor, fixed: torch.Tensor, window: int = 9) -> torch.Tensor:
    """1 + (negative) local normalised cross-correlation over a cubic window, so 0 is perfect."""
    check_volume_batch("warped", warped)
    return 1 + LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=window)(warped, fixed)


def similarity_loss(name: str, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    if name == "correlation":
        return correlation_loss(warped, fixed)
    if name == "local_ncc":
        return local_ncc_loss(warped, fixed)
    raise ValueError(f"unknown similarity {name!r}: expected 'correlation' or 'local_ncc'")


def smoothness_loss(field: torch.Tensor) -> torch.Tensor:
    """Mean squared spatial gradient of a displacement field (voxels)."""
    check_field_batch("field", field)
    return _diffusion(field)


def affine_losses(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VTN's affine regularisers: ``(det M - 1)^2`` keeps volume, and
    ``sum(lambda + 1/lambda - 2)`` over the eigenvalues of ``M^T M`` penalises shear and
    anisotropic scaling (0 exactly for a rotation)."""
    if matrix.ndim != 3 or matrix.shape[1:] != (3, 3):
        raise ValueError(f"matrix: expected shape (B, 3, 3), got {tuple(matrix.shape)}")
    det = torch.linalg.det(matrix)
    eig = torch.linalg.eigvalsh(matrix.transpose(1, 2) @ matrix).clamp_min(1e-6)
    return ((det - 1) ** 2).mean(), (eig + 1 / eig - 2).sum(1).mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "l2",
                      region: torch.Tensor | None = None) -> torch.Tensor:
    """Direct distillation to the teacher's field: mean squared error ('l2') or mean end-point
    error ('epe', the Euclidean length of the difference vector); with a ``region`` (B, 1, D, H, W)
    of 0/1, the mean over its voxels only (see :func:`foreground_region`)."""
    check_field_batch("student field", student)
    check_field_batch("teacher field", teacher, student.shape[2:])
    diff = student - teacher.to(student.dtype)
    if kind == "l2":
        per_voxel = (diff**2).mean(1, keepdim=True)
    elif kind == "epe":
        per_voxel = torch.sqrt((diff**2).sum(1, keepdim=True) + 1e-9)
    else:
        raise ValueError(f"unknown distillation loss {kind!r}: expected 'l2' or 'epe'")
    if region is None:
        return per_voxel.mean()
    if region.shape != per_voxel.shape:
        raise ValueError(f"region {tuple(region.shape)} must be {tuple(per_voxel.shape)} (one channel per field)")
    return (per_voxel * region).sum() / region.sum().clamp_min(1)


# where the teacher's field is worth learning: the fixed image above this fraction of its range
# (the preprocessing's foreground rule), grown by this many voxels so the field that moves the
# brain's edge counts too (at 48x64x48: 67 % of the grid, every labelled voxel inside)
FOREGROUND_FRACTION, FOREGROUND_MARGIN = 0.1, 2


def foreground_region(fixed: torch.Tensor) -> torch.Tensor:
    """0/1 mask (B, 1, D, H, W) of where ``fixed`` has signal. Outside it no image term
    constrains a field, so a teacher's field there is whatever its smoothness left: a student
    taught to copy it spends capacity on nothing the images can check (measured: direct
    distillation cut the student's background error 1.59 -> 0.98 voxels, the brain's 1.25 -> 1.22,
    and lost Dice)."""
    check_volume_batch("fixed", fixed)
    lo = fixed.amin(dim=(1, 2, 3, 4), keepdim=True)
    hi = fixed.amax(dim=(1, 2, 3, 4), keepdim=True)
    mask = (fixed > lo + FOREGROUND_FRACTION * (hi - lo)).to(fixed.dtype)
    k = 2 * FOREGROUND_MARGIN + 1
    return torch.nn.functional.max_pool3d(mask, k, stride=1, padding=FOREGROUND_MARGIN)


def gradient_penalty(critic, teacher: torch.Tensor, student: torch.Tensor, beta: float | None,
                     condition: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP penalty ``(||grad D(z)|| - 1)^2`` on ``z = beta*teacher + (1-beta)*student``;
    ``beta=None`` draws it uniformly per sample (Gulrajani et al.). With a ``condition`` (the
    image pair) the gradient is taken with respect to the field channels only."""
    if beta is None:
        mix = torch.rand(teacher.shape[0], 1, 1, 1, 1, device=teacher.device, dtype=teacher.dtype)
    else:
        mix = torch.full((teacher.shape[0], 1, 1, 1, 1), float(beta), device=teacher.device, dtype=teacher.dtype)
    z = (mix * teacher + (1 - mix) * student).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(with_condition(z, condition)).sum(), z, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


CRITIC_INPUTS = ("raw", "unit_rms")
# what the critic is shown beside the field: nothing (the paper: it can only tell the teacher's
# fields from the student's as a population) or the image pair (moving, fixed) the field
# registers, so that it judges whether the field fits its pair
CRITIC_CONDITIONS = ("none", "pair")


def with_condition(field: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """The critic's input: the (viewed) field, with the condition's channels appended."""
    return field if condition is None else torch.cat([field, condition.to(field.dtype)], 1)


def critic_view(field: torch.Tensor, mode: str = "raw") -> torch.Tensor:
    """What the critic sees of a field. 'raw': the field itself (the paper). 'unit_rms': each
    field divided by its RMS, so that magnitude cannot be the critic's cue: the student's
    adversarial gradient is then orthogonal to its field (it reshapes, never inflates, the field;
    at full magnitude the critic's first lesson was "teacher fields are bigger")."""
    if mode == "raw":
        return field
    if mode == "unit_rms":
        return field / field.pow(2).mean(dim=(1, 2, 3, 4), keepdim=True).add(1e-6).sqrt()
    raise ValueError(f"unknown critic input {mode!r}: expected one of {CRITIC_INPUTS}")


def critic_loss(critic, teacher: torch.Tensor, student: torch.Tensor, beta: float | None, gp_weight: float,
                critic_input: str = "raw", condition: torch.Tensor | None = None):
    """``D(student) - D(teacher) + lambda * GP``: minimised, it scores teacher fields high.
    ``condition`` (B, C, D, H, W), e.g. the moving and fixed images, is shown beside both."""
    check_field_batch("teacher field", teacher)
    check_field_batch("student field", student, teacher.shape[2:])
    student = critic_view(student.detach(), critic_input)
    teacher = critic_view(teacher.to(student.dtype), critic_input)
    wasserstein = critic(with_condition(student, condition)).mean() - critic(with_condition(teacher, condition)).mean()
    return wasserstein + gp_weight * gradient_penalty(critic, teacher, student, beta, condition), wasserstein


# the student's side of the game: the critic's score without bound (the paper's WGAN generator
# loss), only up to the score of its pair's teacher field, or the critic's feature maps of its pair's
# teacher field matched (bounded below by zero: nothing to climb past the teacher)
ADVERSARIAL_TARGETS = ("unbounded", "teacher", "features")


def adversarial_loss(critic, student: torch.Tensor, critic_input: str = "raw",
                     condition: torch.Tensor | None = None, teacher: torch.Tensor | None = None,
                     target: str = "unbounded") -> torch.Tensor:
    """The student's side of the game, with its gradient flowing into the student (the defect of
    the authors' release, where this term had none, is not repeated). ``target`` 'unbounded':
    ``-D(student)`` (the paper). 'teacher': the hinge ``max(0, D(teacher) - D(student))`` against
    its pair's ``teacher`` field, pushed until the critic scores its field like the teacher's and
    no further (every default-run ALDK student climbed the critic's score past the teacher
    fields' into fields no gradient penalty had sampled). 'features':
    :func:`feature_matching_loss` against the pair's teacher field."""
    if target not in ADVERSARIAL_TARGETS:
        raise ValueError(f"unknown adversarial target {target!r}: expected one of {ADVERSARIAL_TARGETS}")
    if target != "unbounded" and teacher is None:
        raise ValueError(f"adversarial target {target!r} needs the pair's teacher field")
    if target == "features":
        return feature_matching_loss(critic, student, teacher, critic_input, condition)
    score = critic(with_condition(critic_view(student, critic_input), condition))
    if target == "unbounded":
        return -score.mean()
    with torch.no_grad():
        bound = critic(with_condition(critic_view(teacher, critic_input), condition))
    return torch.relu(bound - score).mean()


def feature_matching_loss(critic, student: torch.Tensor, teacher: torch.Tensor, critic_input: str = "raw",
                          condition: torch.Tensor | None = None) -> torch.Tensor:
    """Feature matching (Salimans et al. 2016; pix2pixHD's per-pair form): the critic's activation
    maps of the student's field against those of its pair's teacher field, each layer's squared
    difference relative to the teacher's squared activations, averaged over the layers. Zero when
    the fields agree, so the student has nothing to gain past the teacher however the critic's
    scores drift (a WGAN critic's scores are unbounded; its features are what it learned to tell
    the two sets apart by), and scale-free as the critic's activations grow."""
    check_field_batch("student field", student)
    check_field_batch("teacher field", teacher, student.shape[2:])
    ours = critic.feature_maps(with_condition(critic_view(student, critic_input), condition))
    with torch.no_grad():
        theirs = critic.feature_maps(with_condition(critic_view(teacher.to(student.dtype), critic_input), condition))
    terms = [(a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-8) for a, b in zip(ours, theirs)]
    return torch.stack(terms).mean()
