"""Tables (CSV + Markdown) and figures (PNG) in the paper's shape, from the per-pair metrics,
timings and training logs the workflow writes."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import kendalltau, wilcoxon  # noqa: E402

from .evaluate import registration_flag  # noqa: E402
from .io import atomic_path, write_csv  # noqa: E402
from .methods import ANTS, parse_method  # noqa: E402
from .native import pareto_front  # noqa: E402
from .training import TrainConfig  # noqa: E402


def write_table(frame: pd.DataFrame, stem) -> None:
    """``stem``.csv and ``stem``.md."""
    write_csv(frame, f"{stem}.csv")
    with atomic_path(f"{stem}.md") as tmp:
        tmp.write_text(frame.to_markdown(index=False, floatfmt=".4g") + "\n")


def _pm(values) -> str:
    values = pd.Series(values).dropna()
    return f"{values.mean():.3f} ± {values.std(ddof=0):.3f}" if len(values) else "n/a"


def accuracy_table(evals: pd.DataFrame, speed: pd.DataFrame, params: dict) -> pd.DataFrame:
    """One row per method: parameters, Dice mean ± sd, HD95, % |J|<=0, SDlogJ, EPE, CPU s/pair."""
    rows = []
    timed = speed.dropna(subset=["seconds"]) if "seconds" in speed else speed.iloc[0:0]
    cpu = timed[(timed.grid == timed.grid.iloc[0]) & (timed.threads == 1)].set_index("method")["seconds"] if len(timed) else {}
    for method, g in evals.groupby("method", sort=False):
        if "note" in g and g["note"].notna().any():  # a peer that was skipped, and why
            rows.append({"method": method, "note": g["note"].dropna().iloc[0]})
            continue
        row = {"method": method, "parameters": params.get(method, 0), "dice": _pm(g.get("dice", [])),
               "dice_mean": g["dice"].mean() if "dice" in g else np.nan,
               "hd95_mm": g["hd95_mm"].mean() if "hd95_mm" in g else np.nan,
               "folding_percent": 100 * g.folding_fraction.mean(), "sdlogj": g.sdlogj.mean()}
        if "epe_mean_mm" in g:
            row["epe_mm"] = g.epe_mean_mm.mean()
        row["cpu_s_per_pair"] = cpu.get(method, np.nan) if len(cpu) else np.nan
        if np.isnan(row["cpu_s_per_pair"]) and "predict_s" in g and (g.get("threads", 1) == 1).all():
            # methods with no timing job (per-pair optimisation): their 1-thread evaluation time
            row["cpu_s_per_pair"] = float(g.predict_s.median())
        rows.append(row)
    table = pd.DataFrame(rows)
    if "identity" in set(table.method) and "dice_mean" in table:
        identity = float(table.loc[table.method == "identity", "dice_mean"].iloc[0])
        table["flag"] = [registration_flag(d, identity, f) if m != "identity" else ""
                         for m, d, f in zip(table.method, table.dice_mean, table.folding_percent)]
    return table


def speed_table(speed: pd.DataFrame, teacher: str = "teacher", student: str = "student_aldk",
                ants: str = ANTS) -> pd.DataFrame:
    """CPU timing per method, grid and threads, with the speed-ups over the teacher and over ANTs
    SyN and each method's time as a ratio to the ``student``'s (the recommended one; same grid
    and threads, same run). Without a timed ANTs the speed-up over it is NaN."""
    out = speed.copy()  # rows of skipped peers keep their note
    if "cpu" in out:  # the CPU and its features next to the method
        out.insert(1, "cpu", out.pop("cpu"))

    def seconds_of(method):  # the method's time on each row's grid and thread count
        ref = out[out.method == method].set_index(["grid", "threads"])["seconds"]
        return np.array([ref.get((g, t), np.nan) for g, t in zip(out.grid, out.threads)], dtype=float)

    out["speedup_over_teacher"] = seconds_of(teacher) / out.seconds
    out["speedup_over_ants_syn"] = seconds_of(ants) / out.seconds
    out["time_ratio_to_student"] = out.seconds / seconds_of(student)
    return out


def paired_test(evals: pd.DataFrame, method: str, against: str, metric: str = "dice") -> dict:
    """Mean per-pair difference of ``metric`` (method - against) over the pairs both scored, and
    the two-sided Wilcoxon signed-rank p-value (NaN with fewer than 6 pairs or no difference)."""
    a = evals[evals.method == method].set_index("pair_id").get(metric)
    b = evals[evals.method == against].set_index("pair_id").get(metric)
    if a is None or b is None:
        return {"dice_diff_vs_unsupervised": np.nan, "wilcoxon_p": np.nan, "pairs": 0}
    both = pd.concat([a, b], axis=1, join="inner").dropna()
    diff = both.iloc[:, 0] - both.iloc[:, 1]
    p = np.nan
    if len(diff) >= 6 and (diff != 0).any():
        p = float(wilcoxon(diff).pvalue)
    return {"dice_diff_vs_unsupervised": float(diff.mean()) if len(diff) else np.nan, "wilcoxon_p": p,
            "pairs": int(len(diff))}


def _similarity_in_loss(v: dict) -> float:
    weight = v.get("similarity_weight", TrainConfig.similarity_weight)
    return round(weight * v.get("gamma", TrainConfig.gamma), 4) if v.get("adversarial") else weight


# what makes two students "the same architecture and steps" (issue 13: a teacher-taught student
# is judged against the unsupervised student it would be without its teacher)
_SAME_STUDENT = ("kind", "cascades", "width", "depth", "affine", "affine_width", "flow_level", "flow_scale", "steps")


def unsupervised_counterpart(name: str, variants: dict, fallback: str = "unsupervised") -> str:
    """The variant a student's paired test is against: for a teacher-taught student the first
    variant taught by nobody with the same network and steps; otherwise (or where none is
    configured) ``fallback``."""
    own = variants[name]
    if own.get("targets", "none") != "none":
        for other, v in variants.items():
            if v is not None and v.get("targets", "none") == "none" and all(v.get(k) == own.get(k) for k in _SAME_STUDENT):
                return other
    return fallback


def ablation_table(accuracy: pd.DataFrame, variants: dict, evals: pd.DataFrame | None = None,
                   baseline: str = "unsupervised") -> pd.DataFrame:
    """The students side by side with what each variant switches on (``variants``: each one's
    network and training settings as trained, ``pipeline.resolved_variants``) and, where per-pair
    results are given, a paired test on the same test pairs of each teacher-taught student against
    its unsupervised counterpart (:func:`unsupervised_counterpart`; column ``against``) and of each
    other student against ``baseline``."""
    rows = []
    for name, v in variants.items():
        if v is None:
            continue
        method = f"student_{name}"
        acc = accuracy[accuracy.method == method]
        if acc.empty:
            continue
        a = acc.iloc[0]
        row = {"variant": name, "cascades": v.get("cascades", 1), "teacher_targets": v.get("targets", "none"),
               "distillation": v.get("distillation", "none"),
               # the image similarity's weight in the loss as trained (ALDK scales it by gamma)
               "similarity_weight": _similarity_in_loss(v),
               "adversarial": bool(v.get("adversarial", False)), "gamma": v.get("gamma", np.nan) if v.get("adversarial") else np.nan,
               "adversarial_weight": v.get("adversarial_weight", np.nan) if v.get("adversarial") else np.nan,
               "flow_level": int(v.get("flow_level", 0)), "steps": v.get("steps", np.nan),
               "parameters": a.parameters, "dice": a.dice,
               "dice_mean": a.dice_mean, "hd95_mm": a.hd95_mm, "folding_percent": a.folding_percent,
               "epe_mm": a.get("epe_mm", np.nan), "cpu_s_per_pair": a.cpu_s_per_pair, "flag": a.get("flag", "")}
        against = unsupervised_counterpart(name, variants, baseline)
        if evals is not None and against != name and against in variants:
            row.update(against=against, **paired_test(evals, method, f"student_{against}"))
        rows.append(row)
    return pd.DataFrame(rows)


def run_agreement(accuracies: dict, tie: float = 0.005) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Whether runs of one configuration (other threads, machines or seeds) give the same verdict.
    ``accuracies``: run name -> its accuracy table. Returns the methods every run scored, each
    run's mean Dice and rank (1: best), and one row per later run against the first: Kendall's tau
    over the methods' Dice, the largest Dice change, and the pairs of methods whose order swapped
    with a gap above ``tie`` in either run (swaps within ``tie`` are counted apart: run-to-run
    noise decides them)."""
    names = list(accuracies)
    dice = pd.concat({n: a.set_index("method").dice_mean for n, a in accuracies.items()}, axis=1, join="inner")
    table = pd.DataFrame({"method": dice.index})
    for n in names:
        table[f"dice_{n}"] = dice[n].to_numpy()
        table[f"rank_{n}"] = dice[n].rank(ascending=False, method="min").astype(int).to_numpy()
    first, methods = names[0], list(dice.index)
    rows = []
    for n in names[1:]:
        swapped, ties = [], 0
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                before, after = dice.at[a, first] - dice.at[b, first], dice.at[a, n] - dice.at[b, n]
                if np.sign(before) != np.sign(after):
                    if max(abs(before), abs(after)) > tie:
                        swapped.append(f"{a} / {b} ({before:+.3f} -> {after:+.3f})")
                    else:
                        ties += 1
        rows.append({"against": first, "run": n, "methods": len(methods),
                     "kendall_tau": float(kendalltau(dice[first], dice[n]).statistic),
                     "max_abs_dice_change": float((dice[n] - dice[first]).abs().max()),
                     "swaps_beyond_tie": len(swapped), "swaps_within_tie": ties, "tie": tie,
                     "swapped": "; ".join(swapped)})
    return table.sort_values(f"rank_{first}").reset_index(drop=True), pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- figures


def dice_boxplot(evals: pd.DataFrame, path) -> None:
    methods = list(dict.fromkeys(evals.method))
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 4))
    ax.boxplot([evals.loc[evals.method == m, "dice"].dropna() for m in methods], tick_labels=methods)
    ax.set_ylabel("mean Dice per pair")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    _save(fig, path)


def accuracy_vs_time(accuracy: pd.DataFrame, path) -> None:
    """Dice against CPU time per pair (log), with no registration as a dashed line; methods that
    do not register (``flag``) in grey crosses; per-pair optimisation rows in their own colour.
    Labels are nudged apart vertically where they would overlap."""
    rows = accuracy.dropna(subset=["cpu_s_per_pair", "dice_mean"])
    rows = rows[rows.method != "identity"].sort_values("dice_mean")
    fig, ax = plt.subplots(figsize=(9, 6))
    span = max(float(rows.dice_mean.max() - rows.dice_mean.min()), 0.05) if len(rows) else 1.0
    placed: list[tuple[float, float]] = []  # (log10 x, label y) of the labels so far
    for row in rows.itertuples():
        flagged = isinstance(getattr(row, "flag", ""), str) and bool(getattr(row, "flag", ""))
        optimised = parse_method(row.method).optimises
        style = (dict(color="0.6", marker="x") if flagged else
                 dict(color="tab:orange", marker="s") if optimised else dict(color="tab:blue", marker="o"))
        ax.scatter(row.cpu_s_per_pair, row.dice_mean, **style)
        lx, ly = np.log10(row.cpu_s_per_pair), row.dice_mean
        while any(abs(lx - px) < 0.6 and abs(ly - py) < 0.03 * span for px, py in placed):
            ly += 0.03 * span
        placed.append((lx, ly))
        ax.annotate(row.method, (row.cpu_s_per_pair, row.dice_mean), xytext=(row.cpu_s_per_pair * 1.08, ly),
                    fontsize=8, color=style["color"] if flagged else "black", va="center",
                    arrowprops=dict(arrowstyle="-", color="0.8", lw=0.5) if ly != row.dice_mean else None)
    identity = accuracy.loc[accuracy.method == "identity", "dice_mean"]
    if len(identity):
        ax.axhline(float(identity.iloc[0]), color="0.5", ls="--", lw=0.8)
        ax.text(0.01, float(identity.iloc[0]), "no registration", transform=ax.get_yaxis_transform(), fontsize=8,
                color="0.4", va="top")
    ax.set_xscale("log")
    ax.set_xlabel("CPU seconds per pair (1 thread, log scale)")
    ax.set_ylabel("mean Dice (test pairs)")
    ax.set_title("networks (blue), per-pair optimisation (orange), not registering (grey)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


NATIVE_PANELS = {"real": "real anatomy no model saw (Colin27 + AAL)", "cohort": "default cohort's test pairs"}


def _method_style(method: str, flagged: bool) -> dict:
    kind = parse_method(method)
    if flagged:
        return dict(color="0.6", marker="x")
    if kind.peer:
        return dict(color="tab:green", marker="D")
    if kind.optimises:
        return dict(color="tab:orange", marker="s")
    return dict(color="tab:blue", marker="o")


def native_accuracy_vs_time(tables: dict, path, cpu: str = "") -> None:
    """Dice at the scan's own resolution against seconds a pair end to end (log), one panel per
    cohort ('real' first): networks blue, refinement orange, peer optimisers green, methods that
    do not register grey; the Pareto front (no method both faster and more accurate) drawn."""
    cohorts = [c for c in NATIVE_PANELS if c in tables]
    fig, axes = plt.subplots(1, len(cohorts), figsize=(7.5 * len(cohorts), 5.5), squeeze=False)
    for ax, cohort in zip(axes[0], cohorts):
        table = tables[cohort]
        rows = table.dropna(subset=["seconds", "dice_mean"])
        rows = rows[rows.method != "identity"].reset_index(drop=True)
        for row in rows.itertuples():
            flagged = isinstance(row.flag, str) and bool(row.flag)
            ax.scatter(row.seconds, row.dice_mean, zorder=3, **_method_style(row.method, flagged))
            ax.annotate(f"{row.method}" + (f" ({row.pairs} pairs)" if row.pairs < rows.pairs.max() else ""),
                        (row.seconds, row.dice_mean), xytext=(4, 2), textcoords="offset points", fontsize=7)
        if len(rows):
            front = rows.iloc[pareto_front(rows.seconds, rows.dice_mean)]
            ax.step(front.seconds, front.dice_mean, where="post", color="0.3", lw=0.8, ls=":", zorder=2,
                    label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        identity = table.loc[table.method == "identity", "dice_mean"]
        if len(identity):
            ax.axhline(float(identity.iloc[0]), color="0.5", ls="--", lw=0.8)
            ax.text(0.01, float(identity.iloc[0]), "no registration", transform=ax.get_yaxis_transform(), fontsize=8,
                    color="0.4", va="top")
        first = table.dropna(subset=["dice_mean"]).iloc[0]
        ax.set_xscale("log")
        ax.set_xlabel(f"seconds a pair end to end ({int(first.threads)} threads, .nii outputs; log scale)")
        ax.set_ylabel(f"mean Dice at {first['shape']}, {first.spacing_mm:g} mm")
        ax.set_title(NATIVE_PANELS[cohort], fontsize=10)
    fig.suptitle(f"networks (blue), + refinement (orange), Greedy / ANTs (green), not registering (grey) — {cpu}",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def training_curves(logs: dict, path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, frame in logs.items():
        if "loss" not in frame or not len(frame):  # kept at step 0: a run that never passed a check
            axes[0].plot([], [], label=f"{name} (no step kept)")
            continue
        smooth = frame["loss"].rolling(max(1, len(frame) // 20), min_periods=1).mean()
        axes[0].plot(frame.step, smooth, label=name)
        if "wasserstein" in frame:
            axes[1].plot(frame.step, frame["wasserstein"].rolling(max(1, len(frame) // 20), min_periods=1).mean(), label=name)
    axes[0].set(title="training loss (running mean)", xlabel="step", ylabel="loss")
    axes[1].set(title="critic: D(student) - D(teacher)", xlabel="step")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def learning_curves(logs: dict, path) -> None:
    """Validation Dice and end-point error against training step and CPU time, per model, with
    no registration as the floor: whether each model had converged, at a glance."""
    logs = {name: frame for name, frame in logs.items() if len(frame) and "dice" in frame}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, frame in logs.items():
        axes[0].plot(frame.step, frame.dice, marker=".", label=name)
        axes[1].plot(frame.cpu_seconds, frame.dice, marker=".", label=name)
        if "epe_mm" in frame:
            axes[2].plot(frame.step, frame.epe_mm, marker=".", label=name)
    starts = [f.dice.iloc[0] for f in logs.values() if f.step.iloc[0] == 0]
    if starts:  # step 0 of a model without an affine stage is no registration
        for ax in axes[:2]:
            ax.axhline(min(starts), color="grey", ls="--", lw=0.8, label="start (no registration)")
    axes[0].set(title="validation Dice", xlabel="training step", ylabel="mean Dice")
    axes[1].set(title="validation Dice against CPU time", xlabel="CPU seconds of the training process", xscale="log")
    axes[2].set(title="validation end-point error", xlabel="training step", ylabel="mm")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    if not logs:
        axes[0].text(0.5, 0.5, "no validation pairs (evaluation.validation_pairs: 0)", ha="center", transform=axes[0].transAxes)
    fig.tight_layout()
    _save(fig, path)


def _grid_lines(ax, field2d, step=4):
    """Deformed grid of a 2D displacement (2, H, W) in voxels."""
    h, w = field2d.shape[1:]
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    py, px = yy + field2d[0], xx + field2d[1]
    for i in range(0, h, step):
        ax.plot(px[i], py[i], color="y", lw=0.5)
    for j in range(0, w, step):
        ax.plot(px[:, j], py[:, j], color="y", lw=0.5)
    ax.set_xlim(-0.5, w - 0.5)  # lines leaving the volume must not widen the panel
    ax.set_ylim(-0.5, h - 0.5)


def qualitative_panel(moving, fixed, fixed_labels, results: dict, path) -> None:
    """Moving, fixed, then per method the warped image with label contours and the deformation
    grid, all on the fixed image's middle axial slice."""
    z = moving.shape[2] // 2
    cols = 2 + len(results)
    fig, axes = plt.subplots(2, cols, figsize=(2.6 * cols, 5.4))
    show = lambda ax, img, title: (ax.imshow(img[:, :, z].T, cmap="gray", origin="lower"), ax.set_title(title, fontsize=8))
    show(axes[0, 0], moving, "moving")
    show(axes[0, 1], fixed, "fixed")
    axes[1, 0].axis("off")
    if fixed_labels is not None:
        show(axes[1, 1], fixed, "fixed labels")
        axes[1, 1].contour(fixed_labels[:, :, z].T, levels=np.unique(fixed_labels)[1::4], linewidths=0.3, cmap="tab20")
    for k, (name, (warped, warped_labels, field)) in enumerate(results.items(), start=2):
        show(axes[0, k], warped, name)
        if warped_labels is not None:
            axes[0, k].contour(warped_labels[:, :, z].T, levels=np.unique(warped_labels)[1::4], linewidths=0.3, cmap="tab20")
        show(axes[1, k], fixed, "deformation grid")
        _grid_lines(axes[1, k], np.stack([field[1, :, :, z].T, field[0, :, :, z].T]))  # rows: y, columns: x
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
