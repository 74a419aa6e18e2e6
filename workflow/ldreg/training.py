"""Training of the teacher (RCN, unsupervised) and of the students (LDR: unsupervised, direct
distillation, or ALDK with a WGAN-GP critic trained in alternation), with resumable
checkpoints, per-step loss logs and progress with rate and ETA."""
from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from .io import InputError, atomic_path, write_csv
from .losses import (ADVERSARIAL_TARGETS, CRITIC_CONDITIONS, CRITIC_INPUTS, adversarial_loss, affine_losses, critic_loss, distillation_loss, foreground_region, local_ncc_loss,
                     similarity_loss, smoothness_loss)
from .guard import DivergenceGuard, TrainingDiverged
from .networks import CascadedRegistration, Critic
from .optimise import optimise_field, refine_on_grid
from .progress import progress
from .warp import warp_image

log = logging.getLogger(__name__)


TEACHER_REGIONS = ("all", "foreground")


@dataclass(frozen=True)
class ResearchOptions:
    """Options of the critic and the teacher's region that experiments measured and the default
    run does not use (``train.research`` in the config; docs/experiments.md has each verdict).
    Every default is the paper's."""
    critic_input: str = "raw"  # raw (the paper) | unit_rms (each field at unit RMS: magnitude is no cue)
    critic_condition: str = "none"  # none (the paper) | pair (the critic also sees the moving and fixed images)
    # divide the student's adversarial term by sqrt(elements of the field): a WGAN-GP critic's
    # gradient has norm ~1 over the whole field, a mean-reduced similarity's ~1/sqrt(N)
    adversarial_normalise: bool = False
    # spectrally normalised critic layers: its gradient bounded everywhere, not only at the
    # gradient penalty's sampled interpolates
    critic_spectral_norm: bool = False
    # the critic's batch: this step's student field and up to this many earlier ones (detached,
    # each with its pair's teacher field); 0 is the paper's one pair
    critic_history: int = 0
    # where the teacher's field is learnt from (distillation and critic): all (the paper) |
    # foreground (losses.foreground_region of the fixed image; the critic sees both fields zeroed
    # outside it)
    teacher_region: str = "all"

    @classmethod
    def from_dict(cls, d: dict | None) -> "ResearchOptions":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown research option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        options = cls(**d)
        for key, allowed in (("critic_input", CRITIC_INPUTS), ("critic_condition", CRITIC_CONDITIONS),
                             ("teacher_region", TEACHER_REGIONS)):
            if getattr(options, key) not in allowed:
                raise ValueError(f"research.{key} must be one of {allowed}, got {getattr(options, key)!r}")
        if options.critic_history < 0:
            raise ValueError(f"research.critic_history must be >= 0, got {options.critic_history}")
        return options


@dataclass
class TrainConfig:
    """One training job's options. The defaults are the paper's settings, for use as a library;
    the workflow sets every value it changes in config.yaml (:func:`ldreg.pipeline.training_job`)."""

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
    # unbounded: the student's adversarial term is -D(student) (the paper); teacher: the hinge
    # max(0, D(teacher) - D(student)), nothing to gain past the teacher field's score; features:
    # the critic's activation maps of the pair's teacher field matched (losses.feature_matching_loss)
    adversarial_target: str = "unbounded"
    adversarial_ramp_steps: int = 0  # the adversarial weight grows linearly from 0 over these steps
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
    research: ResearchOptions = field(default_factory=ResearchOptions)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
        cfg = cls(**{**d, "research": ResearchOptions.from_dict(d.get("research"))})
        if cfg.on_exhausted not in ("stop", "last_good"):
            raise ValueError(f"on_exhausted must be 'stop' or 'last_good', got {cfg.on_exhausted!r}")
        if cfg.adversarial_target not in ADVERSARIAL_TARGETS:
            raise ValueError(f"adversarial_target must be one of {ADVERSARIAL_TARGETS}, got {cfg.adversarial_target!r}")
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

    def to_dict(self) -> dict:
        """Plain values (the research options as a dict): for model files and tables."""
        return asdict(self)


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
    ``refine`` (``steps`` > 0) refines each field on its pair first: ``method`` ``adam`` (the
    default; the rest of ``refine`` are :func:`ldreg.optimise.optimise_field`'s options) or
    ``greedy`` (``register``'s refinement on the model's grid, :func:`ldreg.optimise.refine_on_grid`;
    similarity: local NCC). Returns per-pair similarity before and after refinement."""
    teacher = teacher.to(device).eval()
    flows, rows = [], []
    refine = {k: v for k, v in (refine or {}).items()}
    steps = refine.pop("steps", 0)
    method = refine.pop("method", "adam")
    if method not in ("adam", "greedy") or (method == "greedy" and refine):
        raise ValueError(f"teacher_cache.refine: method 'adam' (with optimise_field's options) or 'greedy' "
                         f"(steps only), got {method!r} with {sorted(refine)}")
    for row in progress(list(pairs.itertuples()), desc="teacher fields", logger=__name__):
        moving, fixed = images[row.moving].to(device), images[row.fixed].to(device)
        with torch.inference_mode():
            flow = teacher(moving, fixed, warp=False)["flow"]
        record = {}
        if steps and method == "greedy":
            with torch.inference_mode():
                start = float(local_ncc_loss(warp_image(moving, flow), fixed))
                flow = refine_on_grid(moving, fixed, flow, steps)
                record = {"similarity_start": start, "similarity_end": float(local_ncc_loss(warp_image(moving, flow), fixed))}
        elif steps:
            flow, record = optimise_field(moving, fixed, flow.clone(), steps, **refine)
        rows.append({"pair_id": row.pair_id, **record})
        flows.append(flow[0].to("cpu", torch.float16))
    grid = tuple(next(iter(images.values())).shape[2:])
    payload = {"format": "ldreg-flow-cache", "pair_ids": list(pairs.pair_id), "grid": list(grid),
               "refine": {"steps": steps, "method": method, **refine},
               "flows": torch.stack(flows) if flows else torch.zeros(0, 3, *grid, dtype=torch.float16)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return pd.DataFrame(rows)


def _critic_condition(cfg: TrainConfig, moving, fixed):
    return torch.cat([moving, fixed], 1) if cfg.research.critic_condition == "pair" else None


def _teacher_region(cfg: TrainConfig, fixed):
    return foreground_region(fixed) if cfg.research.teacher_region == "foreground" else None


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
        terms["adversarial"] = adversarial_loss(critic, _in_region(out["flow"], region), cfg.research.critic_input, condition,
                                                _in_region(teacher_flow, region), cfg.adversarial_target)
        if cfg.research.adversarial_normalise:
            terms["adversarial"] = terms["adversarial"] / math.sqrt(out["flow"][0].numel())
        total = (total + cfg.similarity_weight * cfg.gamma * terms["similarity"]
                 + adv_scale * cfg.adversarial_weight * (1 - cfg.gamma) * terms["adversarial"])
    else:
        total = total + cfg.similarity_weight * terms["similarity"]
    terms["loss"] = total
    return terms


@dataclass
class TrainResult:
    """What a training run ends with. ``model`` is the last state that passed the divergence
    guard, in eval mode; ``stopped`` is None when every step ran, else why it ended early
    (``{"step", "symptom", "kept_step"}``: diverged with its remedies used up, the model from
    ``kept_step``)."""
    model: CascadedRegistration
    losses: pd.DataFrame  # one row per step kept: loss terms, learning rate, field RMS, seconds
    validation: pd.DataFrame  # one row per validation, with restarts and stopped
    critic: Critic | None
    stopped: dict | None = None


class Trainer:
    """One training run in named parts: :meth:`batch`, :meth:`critic_step`, :meth:`student_step`,
    :meth:`validation`, :meth:`remedy`, :meth:`checkpoint`; :meth:`run` strings them together.

    A :class:`~ldreg.guard.DivergenceGuard` watches every step and validation; on a symptom the
    run goes back to the last state that passed (kept in memory at each validation), halves the
    learning rates and goes on, at most ``max_restarts`` times, then stops with
    :class:`~ldreg.guard.TrainingDiverged` (or, with ``on_exhausted: last_good``, ends at that
    state). Checkpoints and the returned model are only ever states that passed."""

    def __init__(self, model: CascadedRegistration, pairs: pd.DataFrame, images: dict, cfg: TrainConfig,
                 checkpoint_path, flow_cache: FlowCache | None = None, device: str = "cpu", validate=None,
                 name: str = "model"):
        if pairs.empty:
            raise InputError("no training pairs")
        if (cfg.distillation != "none" or cfg.adversarial) and flow_cache is None:
            raise ValueError("distillation and ALDK need the teacher flow cache")
        torch.manual_seed(cfg.seed)
        self.cfg, self.images, self.flow_cache, self.validate, self.name = cfg, images, flow_cache, validate, name
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.critic = self.critic_opt = None
        if cfg.adversarial:
            self.critic = Critic(width=cfg.critic_width, in_channels=3 + 2 * (cfg.research.critic_condition == "pair"),
                                 spectral_norm=cfg.research.critic_spectral_norm).to(self.device).train()
            # WGAN-GP's recommended Adam betas
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.9))
        self.grid = tuple(next(iter(images.values())).shape[2:])
        self.guard = DivergenceGuard(self.grid)
        self.history = deque(maxlen=max(cfg.research.critic_history, 1))  # (student field, teacher field, condition), newest first
        self.records = pairs.to_dict("records")
        self.checkpoint_path = Path(checkpoint_path)
        self.rows, self.val_rows, self.step, self.lr_factor, self.restarts = [], [], 0, 1.0, 0
        self.identity = {}  # validation metrics without registration: the floor
        self.good = None  # the last state that passed
        self.cpu0, self.t0 = time.process_time(), time.perf_counter()

    # -- state ------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        state = {"model": self.model.state_dict(), "optimiser": self.optimiser.state_dict(), "rows": self.rows,
                 "val_rows": self.val_rows, "step": self.step, "lr_factor": self.lr_factor,
                 "restarts": self.restarts, "settings": _resume_settings(self.cfg)}
        if self.critic is not None:
            state.update(critic=self.critic.state_dict(), critic_opt=self.critic_opt.state_dict())
        return copy.deepcopy(state)

    def restore(self, state: dict) -> None:
        """Weights and optimisers from ``state``, with its logs and step."""
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_opt.load_state_dict(state["critic_opt"])
        self.rows, self.val_rows = copy.deepcopy(state["rows"]), copy.deepcopy(state.get("val_rows", []))
        self.step = state["step"]

    def resume(self) -> None:
        """Continue from the checkpoint, if one was written with the same settings."""
        if not self.checkpoint_path.exists():
            return
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        settings = _resume_settings(self.cfg)
        if state.get("settings", settings) != settings:
            changed = sorted(k for k, v in settings.items() if state["settings"].get(k) != v)
            log.warning("%s: %s was written with other training settings (%s): starting afresh", self.name,
                        self.checkpoint_path, ", ".join(changed))
            return
        self.restore(state)
        self.lr_factor, self.restarts = state.get("lr_factor", 1.0), state.get("restarts", 0)
        self.guard.start = [r["similarity"] for r in self.rows[:self.guard.limits.warmup]]
        log.info("%s: resumed from %s at step %d", self.name, self.checkpoint_path, self.step)

    def checkpoint(self) -> None:
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(self.good, tmp)

    # -- one step -----------------------------------------------------------------------------
    def batch(self, step: int):
        """(moving, fixed, teacher field or None) of ``step``: it depends only on (seed, step),
        so a resumed run sees the same pairs."""
        rng = np.random.default_rng([self.cfg.seed, step])
        batch = [self.records[i] for i in rng.integers(0, len(self.records), self.cfg.batch_size)]
        moving = torch.cat([self.images[r["moving"]] for r in batch]).to(self.device)
        fixed = torch.cat([self.images[r["fixed"]] for r in batch]).to(self.device)
        teacher_flow = None
        if self.flow_cache is not None:
            teacher_flow = torch.cat([self.flow_cache.get(r["pair_id"], self.grid) for r in batch]).to(self.device)
        return moving, fixed, teacher_flow

    def critic_step(self, moving, fixed, teacher_flow, condition, region, row: dict) -> None:
        """``critic_steps`` updates of the critic on the student's current fields against the
        teacher's (and, with ``research.critic_history``, earlier ones); its loss and Wasserstein estimate
        go into ``row``."""
        cfg = self.cfg
        for group in self.critic_opt.param_groups:
            group["lr"] = cfg.critic_lr * self.lr_factor
        with torch.no_grad():
            student_flow = self.model(moving, fixed)["flow"]
        samples = [(_in_region(student_flow, region), _in_region(teacher_flow, region), condition)]
        if cfg.research.critic_history:
            samples += list(self.history)
            self.history.appendleft(samples[0])
        students, teachers = torch.cat([s[0] for s in samples]), torch.cat([s[1] for s in samples])
        conditions = None if samples[0][2] is None else torch.cat([s[2] for s in samples])
        for _ in range(cfg.critic_steps):
            d_loss, wasserstein = critic_loss(self.critic, teachers, students, cfg.beta, cfg.gp_weight,
                                              cfg.research.critic_input, conditions)
            self.critic_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.critic_opt.step()
        row["critic"], row["wasserstein"] = float(d_loss.detach()), float(wasserstein.detach())

    def student_step(self) -> str | None:
        """One step of the student (after the critic's, for ALDK). The guard looks at the losses
        before the update, so that no step of a diverging state reaches the weights: returns
        its symptom (nothing updated) or None (updated, logged, ``step`` advanced)."""
        cfg, step = self.cfg, self.step
        moving, fixed, teacher_flow = self.batch(step)
        lr = cfg.lr * cfg.lr_scale(step) * self.lr_factor
        for group in self.optimiser.param_groups:
            group["lr"] = lr
        row = {"step": step + 1, "lr": lr}
        condition = _critic_condition(cfg, moving, fixed)  # what the critic sees beside the field, both sides
        region = _teacher_region(cfg, fixed) if self.flow_cache is not None else None
        if self.critic is not None:
            self.critic_step(moving, fixed, teacher_flow, condition, region, row)
        out = self.model(moving, fixed)
        terms = _loss_terms(self.model, out, moving, fixed, cfg, teacher_flow, self.critic,
                            cfg.adversarial_scale(step), condition, region)
        values = {k: float(v.detach()) for k, v in terms.items()}
        field_rms = float(out["flow"].detach().pow(2).sum(1).mean().sqrt())
        # a critic whose estimate runs away drags a student that climbs its score; a student that
        # matches its features (adversarial_target: features) has nothing to climb, and halving
        # its rate for the critic's swings only starves it (aldk_features.yaml: 3 remedies by step 103)
        watched_critic = None if cfg.adversarial_target == "features" else row.get("wasserstein")
        symptom = self.guard.step(values, field_rms, watched_critic)
        if symptom is not None:
            return symptom
        self.optimiser.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if cfg.grad_clip:
            row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.optimiser.step()
        row.update(values, field_rms=field_rms, seconds=time.perf_counter() - self.t0)
        self.rows.append(row)
        self.step += 1
        return None

    # -- validation, remedy -------------------------------------------------------------------
    def validation(self) -> dict:
        """``validate(model)`` on held-out pairs at the current step, with the CPU and wall seconds so far."""
        self.model.eval()
        with torch.inference_mode():
            metrics = self.validate(self.model)
        self.model.train()
        return {"step": self.step, **metrics, "cpu_seconds": time.process_time() - self.cpu0,
                "seconds": time.perf_counter() - self.t0}

    def after_step(self) -> str | None:
        """Validation when due (its symptom, or None), then the last good state and the checkpoint."""
        cfg, step = self.cfg, self.step
        due = self.validate is not None and (step % cfg.validate_every == 0 or step == cfg.steps)
        if due:
            val = self.validation()
            symptom = self.guard.validation(val, self.identity)
            if symptom is not None:
                return symptom
            self.val_rows.append(val)
            log.info("%s step %d: validation %s (CPU %.0f s)", self.name, step, _fmt(val), val["cpu_seconds"])
        if due or (self.validate is None and step % cfg.checkpoint_every == 0):
            self.good = self.snapshot()
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            self.checkpoint()
        return None

    def remedy(self, symptom: str) -> dict | None:
        """Back to the last good state with halved learning rates. With the remedies used up:
        raises :class:`TrainingDiverged`, or (``on_exhausted: last_good``) ends at that state and
        returns why."""
        cfg, failed_step = self.cfg, self.step + 1
        if self.restarts >= cfg.max_restarts and cfg.on_exhausted == "last_good":
            log.error("%s: diverged at step %d: %s; %d remedies used up: training ends at the last good state "
                      "(step %d), which is what the model file holds", self.name, failed_step, symptom,
                      self.restarts, self.good["step"])
            self.restore(self.good)
            return {"step": failed_step, "symptom": symptom, "kept_step": self.good["step"]}
        if self.restarts >= cfg.max_restarts:
            raise TrainingDiverged(
                f"{self.name}: training diverged at step {failed_step}: {symptom}; {self.restarts} restart(s) from the "
                f"last good state with halved learning rates did not cure it; no model written (last good checkpoint: "
                f"{self.checkpoint_path if self.checkpoint_path.exists() else 'none'})")
        self.restarts += 1
        self.lr_factor *= 0.5
        log.warning("%s: diverged at step %d: %s. Remedy %d/%d: back to the last good state (step %d), learning "
                    "rates halved (x%.3g)", self.name, failed_step, symptom, self.restarts, cfg.max_restarts,
                    self.good["step"], self.lr_factor)
        self.restore(self.good)
        self.history.clear()  # fields of the abandoned steps
        self.good.update(lr_factor=self.lr_factor, restarts=self.restarts)
        self.guard.reset()
        return None

    # -- the run ------------------------------------------------------------------------------
    def run(self, show_progress: bool = True) -> TrainResult:
        self.resume()
        start = self.step
        if self.validate is not None:
            with torch.inference_mode():
                self.identity = self.validate(None)
            log.info("%s: validation pairs without registration: %s", self.name, _fmt(self.identity))
            if not self.val_rows:
                self.val_rows.append(self.validation())
        self.good = self.snapshot()
        bar = progress(total=self.cfg.steps, initial=start, desc=f"train {self.name}", logger=__name__,
                       disable=not show_progress)
        stopped = None
        while self.step < self.cfg.steps:
            symptom = self.student_step()
            if symptom is None:
                bar.update(1)
                bar.set_postfix(loss=f"{self.rows[-1]['loss']:.4f}", refresh=False)
                symptom = self.after_step()
            if symptom is not None:
                stopped = self.remedy(symptom)
                if stopped is not None:
                    break
                bar.reset(total=self.cfg.steps)
                bar.update(self.step)
        bar.close()
        done, seconds = max(self.step - start, 0), time.perf_counter() - self.t0
        log.info("%s: %d steps in %.0f s of this process: %.2f training steps per second (validation included)",
                 self.name, done, seconds, done / max(seconds, 1e-9))
        val_log = pd.DataFrame(self.val_rows)
        if len(val_log):
            val_log["restarts"] = self.restarts
            val_log["stopped"] = "" if stopped is None else (f"diverged at step {stopped['step']} "
                                                             f"({stopped['symptom']}); kept step {stopped['kept_step']}")
        return TrainResult(self.model.eval(), pd.DataFrame(self.rows), val_log, self.critic, stopped)


def train(model: CascadedRegistration, pairs: pd.DataFrame, images: dict, cfg: TrainConfig, checkpoint_path,
          flow_cache: FlowCache | None = None, device: str = "cpu", show_progress: bool = True,
          validate=None, name: str = "model") -> TrainResult:
    """Train ``model`` on ``pairs`` (columns pair_id, moving, fixed), resuming from
    ``checkpoint_path`` if it exists (:class:`Trainer`).

    ``validate(model) -> dict`` (metrics on held-out pairs: dice, epe_mm, folding_percent; see
    :func:`ldreg.evaluate.validator`) runs every ``validate_every`` steps and at the end, each
    time logged with the CPU seconds spent so far."""
    return Trainer(model, pairs, images, cfg, checkpoint_path, flow_cache, device, validate, name).run(show_progress)


def _resume_settings(cfg: TrainConfig) -> dict:
    """What a checkpoint must share with the run that resumes it (more steps may be asked for)."""
    return {k: v for k, v in cfg.to_dict().items() if k != "steps"}


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("dice", "epe_mm", "folding_percent",
                                                                         "similarity"))


def write_loss_log(frame: pd.DataFrame, path, seed: int) -> None:
    frame = frame.copy()
    frame["seed"] = seed
    write_csv(frame, path)
