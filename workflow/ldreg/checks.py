"""Input checks shared by the package: one clear ValueError instead of a trace from torch."""
from __future__ import annotations

import torch


def check_volume_batch(name: str, tensor, channels: int | None = None) -> None:
    """A batch of 3D volumes: a floating tensor shaped (B, C, D, H, W)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor shaped (B, C, D, H, W), got {type(tensor).__name__}")
    if tensor.ndim != 5:
        raise ValueError(f"{name}: expected 5 dimensions (B, C, D, H, W), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {tensor.dtype}")
    if channels is not None and tensor.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channel(s), got shape {tuple(tensor.shape)}")


def check_field_batch(name: str, field, spatial=None) -> None:
    """A batch of displacement fields in voxels: (B, 3, D, H, W), optionally on a given grid."""
    check_volume_batch(name, field, channels=3)
    if spatial is not None and tuple(field.shape[2:]) != tuple(spatial):
        raise ValueError(f"{name}: field grid {tuple(field.shape[2:])} does not match image grid {tuple(spatial)}")


def check_divisible(name: str, shape, factor: int) -> None:
    bad = [s for s in shape if s % factor]
    if bad:
        raise ValueError(f"{name}: every grid size must be divisible by {factor} (2^depth), got {tuple(shape)}")
