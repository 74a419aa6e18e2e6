"""Training of the teacher (RCN, unsupervised) and of the students (LDR: unsupervised, direct
distillation, or ALDK with a WGAN-GP critic trained in alternation), with resumable
checkpoints, per-step loss logs and progress with rate and ETA."""
from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from .io import InputError, atomic_path, write_csv
from .losses import (ADVERSARIAL_TARGETS, CRITIC_CONDITIONS, CRITIC_INPUTS, adversarial_loss, affine_losses, critic_loss, distillation_loss, foreground_region, similarity_loss,
                     smoothness_loss)
from .guard import DivergenceGuard, TrainingDiverged
from .networks import CascadedRegistration, Critic
from .optimise import optimise_field
from .progress import progress

log = logging.getLogger(__name__)


TEACHER_REGIONS = ("all", "foreground")


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
    critic_input: str = "raw"  # raw (the paper) | unit_rms (each field at unit RMS: magnitude is no cue)
    critic_condition: str = "none"  # none (the paper) | pair (the critic also sees the moving and fixed images)
    # divide the student's adversarial term by sqrt(elements of the field): a WGAN-GP critic's
    # gradient has norm ~1 over the whole field, a mean-reduced similarity's ~1/sqrt(N) (measured
    # at 48x64x48: 0.0124 against 0.0034 after 40 critic steps, growing), so without it the
    # adversarial term outweighs the similarity whatever the weights say (the paper: no scaling)
    adversarial_normalise: bool = False
    # spectrally normalised critic layers: its gradient is bounded everywhere (WGAN-GP bounds it
    # only at the sampled interpolates; at batch 1 the default runs' critics ran away: scores
    # swinging +-60 within 20 steps, and the student followed their gradient)
    critic_spectral_norm: bool = False
    # the critic's batch: this step's student field and up to this many earlier ones (detached,
    # each with its pair's teacher field); 0 is the paper's one pair. At one pair the critic's
    # estimate swung by tens within a few steps and the student followed it
    critic_history: int = 0
    # unbounded: the student's adversarial term is -D(student) (the paper); teacher: the hinge
    # max(0, D(teacher) - D(student)), nothing to gain past the teacher field's score; features:
    # the critic's activation maps of the pair's teacher field matched (losses.feature_matching_loss)
    adversarial_target: str = "unbounded"
    adversarial_ramp_steps: int = 0  # the adversarial weight grows linearly from 0 over these steps
    # where the teacher's field is learnt from (distillation and critic): all (the paper) |
    # foreground (losses.foreground_region of the fixed image; the critic sees both fields zeroed
    # outside it)
    teacher_region: str = "all"
    warmup_steps: int = 0  # learning rate grows linearly from 0 over these steps
    lr_schedule: str = "constant"  # constant | cosine (to lr_min_fraction * lr at the last step)
    lr_min_fraction: float = 0.05
    grad_clip: float = 0.0  # max gradient norm; 0: off
    checkpoint_every: int = 50
    validate_every: int = 50  # validation pairs scored (and a good state kept) every N steps
    max_restarts: int = 5  # divergences remedied (last good state, halved learning rates) before giving up
    # when the remedies are used up: 'stop' (TrainingDiverged, no model) or 'last_good' (training
    # ends at the last state that passed; the model file and tables say where and why)
    on_exhausted: str = "stop"

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
        cfg = cls(**d)
        if cfg.on_exhausted not in ("stop", "last_good"):
            raise ValueError(f"on_exhausted must be 'stop' or 'last_good', got {cfg.on_exhausted!r}")
        if cfg.critic_input not in CRITIC_INPUTS:
            raise ValueError(f"critic_input must be one of {CRITIC_INPUTS}, got {cfg.critic_input!r}")
        if cfg.critic_condition not in CRITIC_CONDITIONS:
            raise ValueError(f"critic_condition must be one of {CRITIC_CONDITIONS}, got {cfg.critic_condition!r}")
        if cfg.adversarial_target not in ADVERSARIAL_TARGETS:
            raise ValueError(f"adversarial_target must be one of {ADVERSARIAL_TARGETS}, got {cfg.adversarial_target!r}")
        if cfg.teacher_region not in TEACHER_REGIONS:
            raise ValueError(f"teacher_region must be one of {TEACHER_REGIONS}, got {cfg.teacher_region!r}")
        if cfg.critic_history < 0:
            raise ValueError(f"critic_history must be >= 0, got {cfg.critic_history}")
        if cfg.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
        return cfg

    def lr_scale(self, step: int) -> float:
        """Learning-rate factor at ``step`` (0-based): linear warm-up, then constant or cosine."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            span = max(self.steps - self.warmup_steps - 1, 1)
            progress_ = min((step - self.warmup_steps) / span, 1.0)
            return self.lr_min_fraction + (1 - self.lr_min_fraction) * 0.5 * (1 + math.cos(math.pi * progress_))
        return 1.0

    def adversarial_scale(self, step: int) -> float:
        return min(1.0, (step + 1) / self.adversarial_ramp_steps) if self.adversarial_ramp_steps else 1.0


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


def cache_teacher_flows(teacher: CascadedRegistration, pairs: pd.DataFrame, images: dict, path, device="cpu",
                        refine: dict | None = None) -> pd.DataFrame:
    """Compute the teacher's composed field for every pair once and store it as float16.
    ``refine`` (options of :func:`ldreg.optimise.optimise_field`, with ``steps`` > 0) refines
    each field on its pair first. Returns per-pair similarity before and after refinement."""
    teacher = teacher.to(device).eval()
    flows, rows = [], []
    refine = {k: v for k, v in (refine or {}).items()}
    steps = refine.pop("steps", 0)
    for row in progress(list(pairs.itertuples()), desc="teacher fields", logger=__name__):
        moving, fixed = images[row.moving].to(device), images[row.fixed].to(device)
        with torch.inference_mode():
            flow = teacher(moving, fixed, warp=False)["flow"]
        record = {}
        if steps:
            flow, record = optimise_field(moving, fixed, flow.clone(), steps, **refine)
        rows.append({"pair_id": row.pair_id, **record})
        flows.append(flow[0].to("cpu", torch.float16))
    grid = tuple(next(iter(images.values())).shape[2:])
    payload = {"format": "ldreg-flow-cache", "pair_ids": list(pairs.pair_id), "grid": list(grid),
               "refine": {"steps": steps, **refine},
               "flows": torch.stack(flows) if flows else torch.zeros(0, 3, *grid, dtype=torch.float16)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return pd.DataFrame(rows)


def _critic_condition(cfg: TrainConfig, moving, fixed):
    return torch.cat([moving, fixed], 1) if cfg.critic_condition == "pair" else None


def _teacher_region(cfg: TrainConfig, fixed):
    return foreground_region(fixed) if cfg.teacher_region == "foreground" else None


def _in_region(field, region):
    return field if region is None or field is None else field * region


def _loss_terms(model, out, moving, fixed, cfg: TrainConfig, teacher_flow=None, critic=None, adv_scale: float = 1.0,
                condition=None, region=None):
    terms = {"similarity": similarity_loss(cfg.similarity, out["warped"], fixed)}
    dense = out["fields"][1:] if model.affine is not None else out["fields"]
    terms["smoothness"] = sum(smoothness_loss(f) for f in dense) / max(len(dense), 1)
    total = cfg.smoothness_weight * terms["smoothness"]
    if "affine" in out:
        det, ortho = affine_losses(out["affine"][0])
        terms["affine_det"], terms["affine_ortho"] = det, ortho
        total = total + cfg.affine_det_weight * det + cfg.affine_ortho_weight * ortho
    if cfg.distillation != "none":
        terms["distillation"] = distillation_loss(out["flow"], teacher_flow, cfg.distillation, region)
        total = total + cfg.distillation_weight * terms["distillation"]
    if cfg.adversarial:
        # ALDK: gamma * (1 - CorrCoef) + (1 - gamma) * adversarial (the paper: similarity_weight 1)
        terms["adversarial"] = adversarial_loss(critic, _in_region(out["flow"], region), cfg.critic_input, condition,
                                                _in_region(teacher_flow, region), cfg.adversarial_target)
        if cfg.adversarial_normalise:
            terms["adversarial"] = terms["adversarial"] / math.sqrt(out["flow"][0].numel())
        total = (total + cfg.similarity_weight * cfg.gamma * terms["similarity"]
                 + adv_scale * cfg.adversarial_weight * (1 - cfg.gamma) * terms["adversarial"])
    else:
        total = total + cfg.similarity_weight * terms["similarity"]
    terms["loss"] = total
    return terms


def train(model: CascadedRegistration, pairs: pd.DataFrame, images: dict, cfg: TrainConfig, checkpoint_path,
          flow_cache: FlowCache | None = None, device: str = "cpu", show_progress: bool = True,
          validate=None, name: str = "model"):
    """Train ``model`` on ``pairs`` (columns pair_id, moving, fixed); resumes from
    ``checkpoint_path`` if it exists. Returns (model, loss log, validation log, critic or None).

    ``validate(model) -> dict`` (metrics on held-out pairs: dice, epe_mm, folding_percent; see
    :func:`ldreg.evaluate.validator`) runs every ``validate_every`` steps and at the end, each
    time logged with the CPU seconds spent so far. A :class:`~ldreg.guard.DivergenceGuard`
    watches every step and validation; on a symptom the run goes back to the last state that
    passed (kept in memory at each validation), halves the learning rates and goes on, at most
    ``max_restarts`` times, then stops with :class:`~ldreg.guard.TrainingDiverged`. Checkpoints
    and the returned model are only ever states that passed."""
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
        critic = Critic(width=cfg.critic_width, in_channels=3 + 2 * (cfg.critic_condition == "pair"),
                        spectral_norm=cfg.critic_spectral_norm).to(device).train()
        # WGAN-GP's recommended Adam betas
        critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.9))
    grid = tuple(next(iter(images.values())).shape[2:])
    guard = DivergenceGuard(grid)
    history = deque(maxlen=max(cfg.critic_history, 1))  # (student field, teacher field, condition), newest first

    def snapshot(step, rows, val_rows, lr_factor, restarts) -> dict:
        state = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "rows": rows, "val_rows": val_rows,
                 "step": step, "lr_factor": lr_factor, "restarts": restarts, "settings": _resume_settings(cfg)}
        if critic is not None:
            state.update(critic=critic.state_dict(), critic_opt=critic_opt.state_dict())
        return copy.deepcopy(state)

    def restore(state) -> None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        if critic is not None:
            critic.load_state_dict(state["critic"])
            critic_opt.load_state_dict(state["critic_opt"])

    identity = {}
    cpu0, t0 = time.process_time(), time.perf_counter()

    def run_validation(step) -> dict:
        model.eval()
        with torch.inference_mode():
            metrics = validate(model)
        model.train()
        return {"step": step, **metrics, "cpu_seconds": time.process_time() - cpu0,
                "seconds": time.perf_counter() - t0}

    rows, val_rows, start, lr_factor, restarts = [], [], 0, 1.0, 0
    stopped = None
    checkpoint_path = Path(checkpoint_path)
    state = torch.load(checkpoint_path, map_location=device, weights_only=False) if checkpoint_path.exists() else None
    if state is not None and state.get("settings", _resume_settings(cfg)) != _resume_settings(cfg):
        changed = sorted(k for k, v in _resume_settings(cfg).items() if state["settings"].get(k) != v)
        log.warning("%s: %s was written with other training settings (%s): starting afresh", name, checkpoint_path,
                    ", ".join(changed))
        state = None
    if state is not None:
        restore(state)
        rows, val_rows, start = state["rows"], state.get("val_rows", []), state["step"]
        lr_factor, restarts = state.get("lr_factor", 1.0), state.get("restarts", 0)
        guard.start = [r["similarity"] for r in rows[:guard.limits.warmup]]
        log.info("%s: resumed from %s at step %d", name, checkpoint_path, start)
    if validate is not None:
        with torch.inference_mode():
            identity = validate(None)  # no registration on the same pairs: the floor
        log.info("%s: validation pairs without registration: %s", name, _fmt(identity))
        if not val_rows:
            val_rows.append(run_validation(0))
    good = snapshot(start, rows, val_rows, lr_factor, restarts)
    records = pairs.to_dict("records")
    bar = progress(total=cfg.steps, initial=start, desc=f"train {name}", logger=__name__, disable=not show_progress)
    step = start
    while step < cfg.steps:
        # the batch depends only on (seed, step): a resumed run sees the same pairs
        rng = np.random.default_rng([cfg.seed, step])
        batch = [records[i] for i in rng.integers(0, len(records), cfg.batch_size)]
        moving = torch.cat([images[r["moving"]] for r in batch]).to(device)
        fixed = torch.cat([images[r["fixed"]] for r in batch]).to(device)
        teacher_flow = None
        if flow_cache is not None:
            teacher_flow = torch.cat([flow_cache.get(r["pair_id"], grid) for r in batch]).to(device)
        lr = cfg.lr * cfg.lr_scale(step) * lr_factor
        for group in optimiser.param_groups:
            group["lr"] = lr
        row = {"step": step + 1, "lr": lr}
        condition = _critic_condition(cfg, moving, fixed)  # what the critic sees beside the field, both sides
        region = _teacher_region(cfg, fixed) if flow_cache is not None else None
        if critic is not None:
            for group in critic_opt.param_groups:
                group["lr"] = cfg.critic_lr * lr_factor
            with torch.no_grad():
                student_flow = model(moving, fixed)["flow"]
            samples = [(_in_region(student_flow, region), _in_region(teacher_flow, region), condition)]
            if cfg.critic_history:
                samples += list(history)
                history.appendleft(samples[0])
            students, teachers = torch.cat([s[0] for s in samples]), torch.cat([s[1] for s in samples])
            conditions = None if samples[0][2] is None else torch.cat([s[2] for s in samples])
            for _ in range(cfg.critic_steps):
                d_loss, wasserstein = critic_loss(critic, teachers, students, cfg.beta, cfg.gp_weight,
                                                  cfg.critic_input, conditions)
                critic_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                critic_opt.step()
            row["critic"], row["wasserstein"] = float(d_loss.detach()), float(wasserstein.detach())
        out = model(moving, fixed)
        terms = _loss_terms(model, out, moving, fixed, cfg, teacher_flow, critic, cfg.adversarial_scale(step), condition,
                            region)
        values = {k: float(v.detach()) for k, v in terms.items()}
        field_rms = float(out["flow"].detach().pow(2).sum(1).mean().sqrt())
        # checked before the update, so that no step of a diverging state reaches the weights
        # a critic whose estimate runs away drags a student that climbs its score; a student that
        # matches its features (adversarial_target: features) has nothing to climb, and halving
        # its rate for the critic's swings only starves it (aldk_features.yaml: 3 remedies by step 103)
        watched_critic = None if cfg.adversarial_target == "features" else row.get("wasserstein")
        symptom = guard.step(values, field_rms, watched_critic)
        if symptom is None:
            optimiser.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.grad_clip:
                row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimiser.step()
            row.update(values, field_rms=field_rms, seconds=time.perf_counter() - t0)
            rows.append(row)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            due = validate is not None and (step % cfg.validate_every == 0 or step == cfg.steps)
            if due:
                val = run_validation(step)
                symptom = guard.validation(val, identity)
                if symptom is None:
                    val_rows.append(val)
                    log.info("%s step %d: validation %s (CPU %.0f s)", name, step, _fmt(val), val["cpu_seconds"])
            if symptom is None and (due or (validate is None and step % cfg.checkpoint_every == 0)):
                good = snapshot(step, rows, val_rows, lr_factor, restarts)
            if symptom is None and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                with atomic_path(checkpoint_path) as tmp:
                    torch.save(good, tmp)
        if symptom is not None:
            if restarts >= cfg.max_restarts and cfg.on_exhausted == "last_good":
                log.error("%s: diverged at step %d: %s; %d remedies used up: training ends at the last good state "
                          "(step %d), which is what the model file holds", name, step + 1, symptom, restarts,
                          good["step"])
                restore(good)
                rows, val_rows = copy.deepcopy(good["rows"]), copy.deepcopy(good["val_rows"])
                stopped = {"step": step + 1, "symptom": symptom, "kept_step": good["step"]}
                break
            if restarts >= cfg.max_restarts:
                raise TrainingDiverged(
                    f"{name}: training diverged at step {step + 1}: {symptom}; {restarts} restart(s) from the last good "
                    f"state with halved learning rates did not cure it; no model written (last good checkpoint: "
                    f"{checkpoint_path if checkpoint_path.exists() else 'none'})")
            restarts += 1
            lr_factor *= 0.5
            log.warning("%s: diverged at step %d: %s. Remedy %d/%d: back to the last good state (step %d), learning "
                        "rates halved (x%.3g)", name, step + 1, symptom, restarts, cfg.max_restarts, good["step"],
                        lr_factor)
            restore(good)
            history.clear()  # fields of the abandoned steps
            rows, val_rows, step = copy.deepcopy(good["rows"]), copy.deepcopy(good["val_rows"]), good["step"]
            good.update(lr_factor=lr_factor, restarts=restarts)
            guard.reset()
            bar.reset(total=cfg.steps)
            bar.update(step)
    bar.close()
    done = max(step - start, 0)
    log.info("%s: %d steps in %.0f s of this process: %.2f training steps per second (validation included)", name,
             done, time.perf_counter() - t0, done / max(time.perf_counter() - t0, 1e-9))
    val_log = pd.DataFrame(val_rows)
    if len(val_log):
        val_log["restarts"] = restarts
        val_log["stopped"] = "" if stopped is None else (f"diverged at step {stopped['step']} "
                                                         f"({stopped['symptom']}); kept step {stopped['kept_step']}")
    model.diverged = stopped  # read by the caller for the model file
    return model.eval(), pd.DataFrame(rows), val_log, critic


def _resume_settings(cfg: TrainConfig) -> dict:
    """What a checkpoint must share with the run that resumes it (more steps may be asked for)."""
    return {k: v for k, v in cfg.__dict__.items() if k != "steps"}


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("dice", "epe_mm", "folding_percent",
                                                                         "similarity"))


def write_loss_log(frame: pd.DataFrame, path, seed: int) -> None:
    frame = frame.copy()
    frame["seed"] = seed
    write_csv(frame, path)
