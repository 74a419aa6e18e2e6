"""Model files: weights plus everything needed to rebuild and apply the network (architecture,
preprocessing, training configuration), so `register` needs nothing but the file."""
from __future__ import annotations

from pathlib import Path

import torch

from .preprocessing import Preprocessing
from .io import InputError, atomic_path
from .networks import CascadedRegistration, build_network

FORMAT = "ldreg-model"
VERSION = 1


def save_model(path, model: CascadedRegistration, preprocessing: Preprocessing, training: dict, name: str) -> None:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "spec": model.spec.to_dict(),
        "state_dict": model.state_dict(),
        "preprocessing": preprocessing.to_dict(),
        "training": training,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_model_file(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a readable model file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not an ldreg model file")
    if payload.get("version") != VERSION:
        raise InputError(f"{path}: model file version {payload.get('version')} is not supported (expected {VERSION})")
    return payload


def load_model(path, device: str = "cpu"):
    """Returns (network in eval mode, preprocessing, payload)."""
    payload = read_model_file(path)
    model = build_network(payload["spec"])  # a dict: older spellings of options are mapped
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), Preprocessing.from_dict(payload["preprocessing"]), payload
