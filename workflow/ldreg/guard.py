"""Divergence detection for training: a model that blew up never leaves training.

NaN is the rare case. The ALDK run that shipped a Dice-0 model stayed finite: the critic's
scores ran away (adversarial term -0.07 -> -9.8 in ten steps) and the student followed them
(similarity 1.16, i.e. anti-correlated). The guard compares each step with the run's own
history and each validation with its bounds, and names the symptom.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


FOLDING_BOUND_PERCENT = 1.0  # more folding than this and a field is not a registration one would use


class TrainingDiverged(ValueError):
    """Raised when a run keeps diverging after every remedy; no model file is written."""


@dataclass
class GuardLimits:
    window: int = 50  # steps of history the run-away tests compare with
    warmup: int = 10  # steps before the history-based tests start
    similarity_factor: float = 1.25  # recent similarity loss above this x the start's: diverged
    field_factor: float = 8.0  # field RMS above this x its recent median (and > field_floor of the grid): blew up
    field_floor: float = 0.1  # early growth from the identity is learning, not divergence, below this grid fraction
    field_fraction: float = 0.25  # field RMS above this fraction of the smallest grid side: absurd
    critic_factor: float = 10.0  # |critic estimate| above this x its recent median (and > 2): ran away
    # the critic test waits for a full window: a young WGAN-GP critic's estimate rises from ~0.3 to
    # 3-5 in its first 20-40 steps as it learns to tell teacher from student fields (measured with
    # gradient penalty 10), which is learning, not a run-away
    critic_warmup: int = 50
    folding_percent: float = FOLDING_BOUND_PERCENT  # validation folding above this: diverged
    dice_drop: float = 0.02  # validation Dice this far below no registration: diverged
    # ... but not in the first steps: a teacher-taught student dips below no registration at its
    # first validation (step 100) and recovers; sent back for it at half the rate, a 1-cascade
    # ALDK student ended 0.029 Dice lower (docs/experiments.md). The per-step tests guard those steps
    dice_grace_steps: int = 150


class DivergenceGuard:
    """Feed it every step (:meth:`step`) and every validation (:meth:`validation`); each
    returns ``None`` when all is well, else the symptom in words."""

    def __init__(self, grid, limits: GuardLimits | None = None):
        self.limits = limits or GuardLimits()
        self.max_field = self.limits.field_fraction * min(grid)
        self.field_floor = self.limits.field_floor * min(grid)
        self.reset()

    def reset(self) -> None:
        """Forget the recent history (after restoring a checkpoint); the start is kept."""
        w = self.limits.window
        self.recent = {k: deque(maxlen=w) for k in ("similarity", "field_rms", "critic")}
        if not hasattr(self, "start"):
            self.start: list[float] = []

    def step(self, terms: dict, field_rms: float, critic: float | None = None) -> str | None:
        lim = self.limits
        bad = [k for k, v in terms.items() if v != v or v in (float("inf"), float("-inf"))]
        if bad or field_rms != field_rms:
            return f"{', '.join(bad) or 'field'} not finite"
        sim = terms["similarity"]
        if len(self.start) < lim.warmup:
            self.start.append(sim)
        recent = self.recent
        recent["similarity"].append(sim)
        if field_rms > self.max_field:
            return f"field RMS {field_rms:.1f} voxels exceeds {self.max_field:.1f} ({lim.field_fraction} of the grid)"
        if len(recent["field_rms"]) >= lim.warmup:
            median = statistics.median(recent["field_rms"])
            if field_rms > max(lim.field_factor * median, self.field_floor):
                return f"field RMS blew up: {field_rms:.2f} voxels against a recent median of {median:.2f}"
        recent["field_rms"].append(field_rms)
        if critic is not None:
            if len(recent["critic"]) >= lim.critic_warmup:
                median = statistics.median(abs(c) for c in recent["critic"])
                if abs(critic) > max(lim.critic_factor * median, 2.0):
                    return f"critic estimate ran away: {critic:.2f} against a recent median magnitude of {median:.3f}"
            recent["critic"].append(critic)
        if len(self.start) >= lim.warmup and len(recent["similarity"]) >= lim.warmup:
            begin = statistics.fmean(self.start)
            now = statistics.fmean(list(recent["similarity"])[-lim.warmup:])
            if now > lim.similarity_factor * begin:
                return f"similarity loss {now:.3f} is worse than at the start ({begin:.3f})"
        return None

    def validation(self, metrics: dict, identity: dict) -> str | None:
        """``metrics`` of the model (with its ``step``) and of no registration on the validation
        pairs. Folding is checked at every validation, Dice below no registration only after
        ``dice_grace_steps``."""
        lim = self.limits
        folding = metrics.get("folding_percent", 0.0)
        if folding > lim.folding_percent:
            return f"validation folding {folding:.2f} % of voxels exceeds {lim.folding_percent} %"
        if metrics.get("step", float("inf")) <= lim.dice_grace_steps:
            return None
        dice, base = metrics.get("dice"), identity.get("dice")
        if dice is not None and base is not None and dice == dice and dice < base - lim.dice_drop:
            return f"validation Dice {dice:.3f} below no registration ({base:.3f})"
        return None
