"""Training of the teacher (RCN, unsupervised) and of the students (LDR: unsupervised, direct
distillation, or ALDK with a WGAN-GP critic trained in alternation), with resumable
checkpoints, per-step loss logs and progress with rate and ETA."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from .io import InputError, atomic_path, write_csv
from .losses import (adversarial_loss, affine_losses, critic_loss, distillation_loss, similarity_loss,
                     smoothness_loss)
from .networks import CascadedRegistration, Critic
from .progress import progress

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 1
    lr: float = 1e-4
    seed: int = 0
    similarity: str = "correlation"
    similarity_weight: float = 1.0
    smoothness_weight: float = 1.0
    affine_det_weight: float = 0.1
    affine_ortho_weight: float = 0.1
    distillation: str = "none"  # none | l2 | epe
    distillation_weight: float = 0.0
    adversarial: bool = False
    adversarial_weight: float = 1.0  # scales the (1 - gamma) adversarial term; 1 is the paper's loss
    gamma: float = 0.3
    beta: float | None = 0.1
    gp_weight: float = 0.1
    critic_steps: int = 1
    critic_lr: float = 1e-4
    critic_width: int = 8
    checkpoint_every: int = 50

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def device_for(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but CUDA is not available")
    return torch.device(name)


def load_images(subjects: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Preprocessed images by subject id, as (1, 1, D, H, W) float tensors."""
    out = {}
    for row in subjects.itertuples():
        data = np.asarray(nib.load(row.image).dataobj, dtype=np.float32)
        out[row.id] = torch.from_numpy(data)[None, None]
    return out


class FlowCache:
    """Teacher displacement fields for the training pairs (float16), keyed by pair id."""

    def __init__(self, path):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != "ldreg-flow-cache":
            raise InputError(f"{path}: not a teacher flow cache")
        self.path, self.pair_ids, self.flows = Path(path), list(payload["pair_ids"]), payload["flows"]
        self.grid = tuple(payload["grid"])
        self.index = {pid: i for i, pid in enumerate(self.pair_ids)}
        if self.flows.dtype != torch.float16 or tuple(self.flows.shape[1:]) != (3, *self.grid):
            raise InputError(f"{path}: expected float16 fields (N, 3, {self.grid}), got {self.flows.dtype} {tuple(self.flows.shape)}")

    def get(self, pair_id: str, grid) -> torch.Tensor:
        if pair_id not in self.index:
            raise InputError(f"{self.path}: no cached teacher field for pair {pair_id}; rebuild the cache")
        if tuple(grid) != self.grid:
            raise InputError(f"{self.path}: cached grid {self.grid} differs from the data grid {tuple(grid)}")
        return self.flows[self.index[pair_id]].float()[None]


@torch.inference_mode()
def cache_teacher_flows(teacher: CascadedRegistration, pairs: pd.DataFrame, images: dict, path, device="cpu") -> None:
    """Compute the teacher's composed field for every pair once and store it as float16."""
    teacher = teacher.to(device).eval()
    flows = []
    for row in progress(list(pairs.itertuples()), desc="teacher fields", logger=__name__):
        out = teacher(images[row.moving].to(device), images[row.fixed].to(device))
        flows.append(out["flow"][0].to("cpu", torch.float16))
    grid = tuple(next(iter(images.values())).shape[2:])
    payload = {"format": "ldreg-flow-cache", "pair_ids": list(pairs.pair_id), "grid": list(grid),
               "flows": torch.stack(flows) if flows else torch.zeros(0, 3, *grid, dtype=torch.float16)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _loss_terms(model, out, moving, fixed, cfg: TrainConfig, teacher_flow=None, critic=None):
    terms = {"similarity": similarity_loss(cfg.similarity, out["warped"], fixed)}
    dense = out["fields"][1:] if model.affine is not None else out["fields"]
    terms["smoothness"] = sum(smoothness_loss(f) for f in dense) / max(len(dense), 1)
    total = cfg.smoothness_weight * terms["smoothness"]
    if "affine" in out:
        det, ortho = affine_losses(out["affine"][0])
        terms["affine_det"], terms["affine_ortho"] = det, ortho
        total = total + cfg.affine_det_weight * det + cfg.affine_ortho_weight * ortho
    if cfg.distillation != "none":
        terms["distillation"] = distillation_loss(out["flow"], teacher_flow, cfg.distillation)
        total = total + cfg.distillation_weight * terms["distillation"]
    if cfg.adversarial:
        # ALDK: gamma * (1 - CorrCoef) + (1 - gamma) * adversarial
        terms["adversarial"] = adversarial_loss(critic, out["flow"])
        total = total + cfg.gamma * terms["similarity"] + cfg.adversarial_weight * (1 - cfg.gamma) * terms["adversarial"]
    else:
        total = total + cfg.similarity_weight * terms["similarity"]
    terms["loss"] = total
    return terms


def train(model: CascadedRegistration, pairs: pd.DataFrame, images: dict, cfg: TrainConfig, checkpoint_path,
          flow_cache: FlowCache | None = None, device: str = "cpu", show_progress: bool = True):
    """Train ``model`` on ``pairs`` (columns pair_id, moving, fixed); resumes from
    ``checkpoint_path`` if it exists. Returns (model, loss log frame, critic or None)."""
    if pairs.empty:
        raise InputError("no training pairs")
    if (cfg.distillation != "none" or cfg.adversarial) and flow_cache is None:
        raise ValueError("distillation and ALDK need the teacher flow cache")
    torch.manual_seed(cfg.seed)
    device = torch.device(device)
    model = model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    critic = critic_opt = None
    if cfg.adversarial:
        critic = Critic(width=cfg.critic_width).to(device).train()
        # WGAN-GP's recommended Adam betas
        critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.9))
    rows, start = [], 0
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        if critic is not None:
            critic.load_state_dict(state["critic"])
            critic_opt.load_state_dict(state["critic_opt"])
        rows, start = state["rows"], state["step"]
        log.info("resumed from %s at step %d", checkpoint_path, start)
    grid = next(iter(images.values())).shape[2:]
    records = pairs.to_dict("records")
    bar = progress(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", logger=__name__,
                   disable=not show_progress)
    t0 = time.perf_counter()
    for step in bar:
        # the batch depends only on (seed, step): a resumed run sees the same pairs
        rng = np.random.default_rng([cfg.seed, step])
        batch = [records[i] for i in rng.integers(0, len(records), cfg.batch_size)]
        moving = torch.cat([images[r["moving"]] for r in batch]).to(device)
        fixed = torch.cat([images[r["fixed"]] for r in batch]).to(device)
        teacher_flow = None
        if flow_cache is not None:
            teacher_flow = torch.cat([flow_cache.get(r["pair_id"], grid) for r in batch]).to(device)
        row = {"step": step + 1}
        if critic is not None:
            with torch.no_grad():
                student_flow = model(moving, fixed)["flow"]
            for _ in range(cfg.critic_steps):
                d_loss, wasserstein = critic_loss(critic, teacher_flow, student_flow, cfg.beta, cfg.gp_weight)
                critic_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                critic_opt.step()
            row["critic"], row["wasserstein"] = float(d_loss.detach()), float(wasserstein.detach())
        out = model(moving, fixed)
        terms = _loss_terms(model, out, moving, fixed, cfg, teacher_flow, critic)
        if not torch.isfinite(terms["loss"]):  # stop before NaN reaches the weights and the model file
            bad = ", ".join(k for k, v in terms.items() if not torch.isfinite(v))
            raise ValueError(f"training diverged at step {step + 1}: {bad} not finite; the last checkpoint "
                             f"({checkpoint_path}) is kept; try a lower learning rate")
        optimiser.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimiser.step()
        row.update({k: float(v.detach()) for k, v in terms.items()})
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            state = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "rows": rows, "step": step + 1}
            if critic is not None:
                state.update(critic=critic.state_dict(), critic_opt=critic_opt.state_dict())
            with atomic_path(checkpoint_path) as tmp:
                torch.save(state, tmp)
    return model.eval(), pd.DataFrame(rows), critic


def write_loss_log(frame: pd.DataFrame, path, seed: int) -> None:
    frame = frame.copy()
    frame["seed"] = seed
    write_csv(frame, path)
