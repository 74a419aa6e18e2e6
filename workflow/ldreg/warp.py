"""Warping by dense displacement fields in voxel units, composition, and scaling and squaring.

Convention (used everywhere in the project): a field ``u`` of shape (B, 3, D, H, W) maps a
voxel ``x`` of the fixed grid to the point ``x + u(x)`` of the moving image, channel ``i``
being the displacement along tensor dimension ``2 + i``. Warping samples the moving image
there. MONAI's ``Warp`` does the sampling (align_corners, border padding, so an identity
field returns the input exactly and nothing fades in from outside the volume).
"""
from __future__ import annotations

import functools

import torch
from monai.networks.blocks import DVF2DDF, Warp

from .checks import check_field_batch, check_volume_batch


@functools.lru_cache(maxsize=None)
def _warper(mode: str) -> Warp:
    return Warp(mode=mode, padding_mode="border")


def warp_image(image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Trilinear warp of ``image`` (B, C, D, H, W) by ``field`` (B, 3, D, H, W)."""
    check_volume_batch("image", image)
    check_field_batch("field", field, image.shape[2:])
    return _warper("bilinear")(image, field.to(image.dtype))


def warp_labels(labels: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp of an integer label map (B, 1, D, H, W); keeps the dtype and the
    label set (no new values can appear)."""
    if not isinstance(labels, torch.Tensor) or labels.ndim != 5:
        raise ValueError(f"labels: expected a tensor shaped (B, 1, D, H, W), got {getattr(labels, 'shape', type(labels))}")
    check_field_batch("field", field, labels.shape[2:])
    # float64 holds every integer label exactly (float32 would not beyond 2^24)
    warped = _warper("nearest")(labels.to(torch.float64), field.to(torch.float64))
    return warped.round().to(labels.dtype)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Field equal to warping by ``first`` and then warping the result by ``second``.

    Warping by ``first`` then ``second`` samples the moving image at
    ``x + second(x) + first(x + second(x))``, hence ``second + first o (id + second)``.
    """
    check_field_batch("first", first)
    check_field_batch("second", second, first.shape[2:])
    return second + _warper("bilinear")(first, second)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement of the flow of a stationary velocity field (voxels), by scaling and
    squaring; ``-velocity`` gives the inverse. Always a diffeomorphism for smooth input."""
    check_field_batch("velocity", velocity)
    return DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")(velocity)


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates (3, D, H, W) of a grid."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))
