"""The workflow's jobs as plain functions of paths and config sections: the rule scripts only
unpack ``snakemake`` and call these, so every step runs and is tested without Snakemake."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from . import data as data_mod
from . import peers
from .allocator import keep_freed_memory
from .config_checks import speed_profile_problems, student_targets, student_uses_teacher, student_variant
from .engines import cpu_summary, device_for
from .evaluate import evaluate_pairs, flow_predictor, refined_predictor, validator
from .io import InputError, write_csv
from .methods import ANTS, Method, parse_method
from .modelfile import load_model, read_model_file, save_model
from .networks import CascadeSpec, build_network, complexity
from .settings import RunSettings
from .timing import time_ants as time_ants_registration, time_model_grid
from .warp import warp_image, warp_labels

log = logging.getLogger("ldreg")

# report (matplotlib, scipy.stats) and training (MONAI's losses) are imported by the jobs that use
# them: 1.5 of the 2.5 s that importing this module took, paid by every evaluation job


def usable_threads(threads) -> int:
    """Threads a job runs: its scheduler slots over the slots a thread takes (more than one when
    a local run says more --cores than the machine has: ``slots`` in workflow/rules/common.smk),
    capped at the cores this process may use."""
    per_thread = float(os.environ.get("LDREG_SLOTS_PER_THREAD", "1") or 1)
    return max(1, min(int(int(threads) / max(per_thread, 1.0) + 1e-6), len(os.sched_getaffinity(0))))


def setup_logging(log_path=None, threads: int | None = None) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    keep_freed_memory()
    if threads:
        torch.set_num_threads(usable_threads(threads))


# ------------------------------------------------------------------------------------- data


def make_synthetic(config: dict, out_dir, manifest, threads: int = 1) -> None:
    data_mod.make_synthetic_cohort(out_dir, RunSettings.from_config(config).data.synthetic, usable_threads(threads))


def fetch_dataset(spec: dict, resources_dir, done_flag) -> None:
    archive = data_mod.download(spec["url"], Path(resources_dir) / spec["archive"], spec.get("checksum"))
    data_mod.unpack(archive, Path(resources_dir) / "unpacked")
    Path(done_flag).write_text(json.dumps({"url": spec["url"], "sha256": data_mod.sha256sum(archive)}) + "\n")


def raw_subjects(settings: RunSettings, source_root) -> pd.DataFrame:
    """The raw subjects manifest of the configured source."""
    data = settings.data
    if data.source == "synthetic":
        return pd.read_csv(Path(source_root) / "subjects.csv")
    if data.source == "folder":
        f = data.folder
        return data_mod.folder_subjects(f["root"], f["image_glob"], f.get("label_pattern"), f.get("label_replacement"))
    spec = data.download()
    return data_mod.folder_subjects(Path(source_root) / "unpacked", spec["image_glob"], spec.get("label_pattern"),
                                    spec.get("label_replacement"))


def preprocess(config: dict, source_root, out_dir, subjects_csv, pairs_csv, threads: int = 1) -> None:
    settings = RunSettings.from_config(config)
    raw = raw_subjects(settings, source_root)
    if settings.data.max_subjects:
        raw = raw.iloc[:settings.data.max_subjects]
    pairs_cfg = settings.pairs
    subjects, pairs = data_mod.preprocess_cohort(
        raw, out_dir, settings.preprocessing, settings.splits.fractions(), settings.seed, pairs_cfg.train,
        pairs_cfg.test_mode, pairs_cfg.max_test, settings.data.label_map, usable_threads(threads))
    write_csv(subjects, subjects_csv)
    write_csv(pairs, pairs_csv)
    log.info("%d subjects (%s), %d pairs", len(subjects), subjects.split.value_counts().to_dict(), len(pairs))


# --------------------------------------------------------------------------------- training


def training_inputs(subjects_csv, pairs_csv):
    """(images of the subjects the training pairs use, by id; the training pairs) of a run's data."""
    from .training import load_images

    subjects = pd.read_csv(subjects_csv)
    pairs = pd.read_csv(pairs_csv)
    train_pairs = pairs[pairs.split == "train"].reset_index(drop=True)
    needed = set(train_pairs.moving) | set(train_pairs.fixed)
    return load_images(subjects[subjects.id.isin(needed)]), train_pairs


def training_validator(settings: RunSettings, subjects_csv, pairs_csv, device: str = "cpu"):
    """The learning-curve and divergence check on the first ``evaluation.validation_pairs``
    validation pairs (never test pairs); None when switched off (0)."""
    n = settings.evaluation.validation_pairs
    if not n:
        return None
    pairs = pd.read_csv(pairs_csv)
    val = pairs[pairs.split == "val"].head(n)
    if val.empty:
        raise InputError(f"{pairs_csv}: no validation pairs for the learning curves; set splits.val > 0 "
                         f"(or evaluation.validation_pairs: 0 to switch them off)")
    return validator(pd.read_csv(subjects_csv), val, settings.spacing_mm, device)


def _run_training(name, rule: str, variant: str | None, config, subjects_csv, pairs_csv, model_out, loss_csv,
                  checkpoint, flow_cache_path=None, val_csv=None):
    from .training import FlowCache, train, write_loss_log

    images, pairs = training_inputs(subjects_csv, pairs_csv)
    settings = RunSettings.from_config(config)
    spec, cfg = training_job(config, rule, variant)
    model = build_network(spec, seed=cfg.seed)
    grid = settings.grid
    info = complexity(model, grid)
    log.info("%s: %s, %d parameters, %.2f GFLOPs per pair at %s, %d threads on %s", name, spec, info["parameters"],
             info["flops"] / 1e9, grid, torch.get_num_threads(), cpu_summary())
    cache = FlowCache(flow_cache_path) if flow_cache_path else None
    device = device_for(settings.device)
    validate = training_validator(settings, subjects_csv, pairs_csv, str(device))
    result = train(model, pairs, images, cfg, checkpoint, cache, str(device), validate=validate, name=name)
    write_loss_log(result.losses, loss_csv, cfg.seed)
    if val_csv:
        write_loss_log(result.validation.assign(model=name), val_csv, cfg.seed)
    training = {"config": cfg.to_dict(), "pairs": len(pairs), "diverged": result.stopped}
    save_model(model_out, result.model.cpu(), settings.preprocessing, training, name)
    Path(checkpoint).unlink(missing_ok=True)  # done: the model file supersedes it


def _spec(kind: str, settings: dict) -> CascadeSpec:
    """The network of a config section (``teacher`` or a student variant merged over
    ``students.defaults``): config.yaml sets every network key, so nothing is defaulted here."""
    return CascadeSpec(kind=kind, **{k: v for k, v in settings.items() if k not in ("train", "targets")})


def training_job(config: dict, rule: str, variant: str | None = None):
    """The typed settings of a training job, read from the validated config in one place:
    (network, :class:`ldreg.training.TrainConfig`) of rule ``train_teacher``, ``train_student``
    (``variant`` merged over ``students.defaults``) or ``train_voxelmorph`` (the students' training
    defaults under the peer's own)."""
    from .training import TrainConfig

    if rule == "train_teacher":
        spec, own = _spec("teacher", config["teacher"]), config["teacher"].get("train", {})
    elif rule == "train_student":
        settings = student_variant(config, variant)
        spec, own = _spec("student", settings), settings["train"]
    elif rule == "train_voxelmorph":
        peer = config["peers"]["voxelmorph"]
        spec = CascadeSpec(kind="voxelmorph", cascades=1, width=peer["width"], depth=peer["depth"], affine=False)
        own = {**config["students"].get("defaults", {}).get("train", {}), **peer.get("train", {})}
    else:
        raise ValueError(f"{rule!r} is not a training rule")
    return spec, TrainConfig.from_dict({"seed": config["seed"], **own})


def student_settings(config: dict, variant: str):
    """(network, TrainConfig) of a student variant."""
    return training_job(config, "train_student", variant)


def train_teacher(config, subjects_csv, pairs_csv, model_out, loss_csv, checkpoint, val_csv=None) -> None:
    _run_training("teacher", "train_teacher", None, config, subjects_csv, pairs_csv, model_out, loss_csv, checkpoint,
                  val_csv=val_csv)


def train_student(config, variant, subjects_csv, pairs_csv, flow_cache, model_out, loss_csv, checkpoint,
                  val_csv=None) -> None:
    _run_training(f"student_{variant}", "train_student", variant, config, subjects_csv, pairs_csv, model_out, loss_csv,
                  checkpoint, flow_cache if student_uses_teacher(config, variant) else None, val_csv)


def training_steps(config: dict, rule: str, variant: str | None = None) -> int:
    """The steps a training job (rule train_teacher, train_student of ``variant``, train_voxelmorph) runs."""
    return training_job(config, rule, variant)[1].steps


def train_voxelmorph(config, subjects_csv, pairs_csv, model_out, loss_csv, checkpoint, val_csv=None) -> None:
    """The VoxelMorph peer, with the students' data and step budget unless overridden."""
    _run_training("peer_voxelmorph", "train_voxelmorph", None, config, subjects_csv, pairs_csv, model_out, loss_csv,
                  checkpoint, val_csv=val_csv)


def cache_flows(config, teacher_path, subjects_csv, pairs_csv, out, refine: dict | None = None) -> None:
    """The teacher's field for every training pair; ``refine`` (teacher_cache.refine's form; None or
    steps 0: none) refines each on its pair first."""
    from .training import cache_teacher_flows

    images, pairs = training_inputs(subjects_csv, pairs_csv)
    model, _, _ = load_model(teacher_path)
    refine = dict(refine or {"steps": 0})
    report = cache_teacher_flows(model, pairs, images, out, str(device_for(RunSettings.from_config(config).device)),
                                 refine)
    if refine["steps"]:
        log.info("refined %d teacher fields by %d steps: similarity loss %.4f -> %.4f (mean)", len(report),
                 refine["steps"], report.similarity_start.mean(), report.similarity_end.mean())


# ------------------------------------------------------------------------------- evaluation


def evaluate(config, method: str, model_path, subjects_csv, pairs_csv, per_pair_csv, per_label_csv) -> None:
    """``method`` is 'identity', 'affine' (the teacher's affine stage) or a model name."""
    settings = RunSettings.from_config(config)
    subjects, pairs = pd.read_csv(subjects_csv), pd.read_csv(pairs_csv)
    test = pairs[pairs.split == "test"]
    spec, device = parse_method(method), str(device_for(settings.device))
    missing = _missing_peer(spec)
    if missing:
        _write_skipped(method, missing, per_pair_csv, per_label_csv)
        return
    spacing = settings.spacing_mm
    if spec.kind == "ants":
        predict = peers.ants_predictor(spacing, torch.get_num_threads())
    elif spec.kind == "greedy":
        predict = peers.greedy_predictor(spacing, torch.get_num_threads(),
                                         peers.greedy_setting(settings.greedy, spec.setting))
    elif spec.optimises:
        predict = refined_predictor(spec, model_path, settings.evaluation.refine.optimiser, device)
    else:
        predict = flow_predictor(spec.kind, model_path, device)
    per_pair, per_label = evaluate_pairs(method, predict, subjects, test, spacing, settings.evaluation.hd95)
    write_csv(per_pair, per_pair_csv)
    write_csv(per_label, per_label_csv)


def _missing_peer(method: Method) -> str:
    """Why a peer cannot run here ('' when it can)."""
    if method.kind == "ants" and not peers.ANTS_AVAILABLE:
        return peers.ants_missing_note()
    if method.kind == "greedy" and not peers.GREEDY_AVAILABLE:
        return peers.greedy_missing_note()
    return ""


def _write_skipped(method: str, note: str, per_pair_csv, per_label_csv) -> None:
    """A skipped peer's evaluation: one row that says why, read by the tables as a note."""
    log.warning("%s: %s", method, note)
    write_csv(pd.DataFrame([{"method": method, "note": note}]), per_pair_csv)
    write_csv(pd.DataFrame(columns=["method", "pair_id", "label", "dice"]), per_label_csv)


def evaluate_native(config, method: str, model_path, pairs_csv, per_pair_csv, per_label_csv, cohort: str,
                    source_root=None, threads: int = 1) -> None:
    """One method on the native-resolution pairs of ``cohort``: 'cohort' (the test pairs at the
    subjects' own resolution) or 'real' (the real-anatomy pairs, :mod:`ldreg.real_anatomy`)."""
    from .native import cohort_native_pairs, evaluate_native as evaluate_pairs_native, native_runner

    spec = parse_method(method)
    missing = _missing_peer(spec)
    if missing:
        _write_skipped(method, missing, per_pair_csv, per_label_csv)
        return
    settings = RunSettings.from_config(config)
    native = settings.native
    if cohort == "cohort":
        pairs = cohort_native_pairs(raw_subjects(settings, source_root), pd.read_csv(pairs_csv))
    else:
        pairs = pd.read_csv(pairs_csv)
    if spec.kind == "ants" and native.ants_pairs:
        pairs = pairs.head(native.ants_pairs)  # about two minutes a pair at 1 mm
    run = native_runner(spec, model_path, settings.evaluation.refine.spacings, settings.greedy,
                        usable_threads(threads), str(device_for(settings.device)))
    per_pair, per_label = evaluate_pairs_native(method, run, pairs, native.hd95)
    write_csv(per_pair.assign(cohort=cohort, cpu=cpu_summary()), per_pair_csv)
    write_csv(per_label, per_label_csv)


def make_real_anatomy(config, out_dir) -> None:
    from .real_anatomy import make_real_anatomy_pairs

    make_real_anatomy_pairs(RunSettings.from_config(config).real_anatomy, out_dir)


def register_batch(config, model_path, pairs_csv, out_dir) -> None:
    """The ``batch`` config's pairs through ``register-batch`` (:mod:`ldreg.batch`)."""
    from .batch import BatchOptions, batch_pairs
    from .batch import register_batch as run_batch
    from .optimise import refine_schedule
    from .register import Registrar

    settings = RunSettings.from_config(config)
    b = settings.batch
    pairs = batch_pairs(None if b.moving_dir else pairs_csv, b.moving_dir, b.fixed, b.pattern)
    try:  # batch.refine_steps null: register's default
        levels = refine_schedule(b.refine_steps, settings.evaluation.refine.spacings)
    except ValueError as exc:
        raise InputError(f"config batch.refine_steps / evaluation.refine.spacings: {exc}") from None
    registrar = Registrar(model_path, channels_last=True, refine_levels=levels)
    summary = run_batch(registrar, pairs, out_dir, BatchOptions(suffix=b.suffix, qc=b.qc))
    failed = summary[summary.status == "error"]
    if len(failed):
        raise InputError(f"{len(failed)} of {len(summary)} pairs failed: " +
                         "; ".join(f"{r.pair_id}: {r.error}" for r in failed.itertuples()))


def native_tables(config, eval_csvs: dict, out_dir, figure_path) -> None:
    """``accuracy_native`` (the cohort's test pairs at their own resolution) and
    ``accuracy_real`` (the real anatomy), CSV + Markdown, and the accuracy-vs-time figure of both."""
    from .native import native_accuracy_table
    from .report import native_accuracy_vs_time, write_table

    tables, seed = {}, RunSettings.from_config(config).seed
    for cohort, paths in eval_csvs.items():
        evals = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
        table = native_accuracy_table(evals).assign(cpu=cpu_summary(), seed=seed)
        write_table(table, Path(out_dir) / ("accuracy_native" if cohort == "cohort" else "accuracy_real"))
        tables[cohort] = table
    native_accuracy_vs_time(tables, figure_path, cpu_summary())


def time_cpu(config, model_path, out_csv, threads: int) -> None:
    settings = RunSettings.from_config(config)
    t = settings.timing
    counts = sorted({1, usable_threads(threads)})
    grids = [settings.grid] + [tuple(g) for g in t.extra_grids]
    rows = time_model_grid(model_path, grids, counts, t.repeats, t.warmup)
    write_csv(pd.DataFrame(rows).assign(cpu=cpu_summary()), out_csv)


def time_ants(config, out_csv, threads: int) -> None:
    """ANTs SyN's registration per pair at the default grid, on the brain pair the speed profile
    times (128^3 SyN would take minutes a run: left out)."""
    if not peers.ANTS_AVAILABLE:
        write_csv(pd.DataFrame([{"note": peers.ants_missing_note()}]), out_csv)
        return
    settings = RunSettings.from_config(config)
    grid = settings.grid
    repeats, rows = max(1, settings.timing.repeats // 2), []
    for n in sorted({1, usable_threads(threads)}):
        res = time_ants_registration(grid, settings.spacing_mm, n, repeats)
        rows.append({"grid": "x".join(map(str, grid)), "threads": n, "parameters": 0, "gflops": np.nan,
                     "repeats": repeats, **res, "cpu": cpu_summary()})
    write_csv(pd.DataFrame(rows), out_csv)


# ----------------------------------------------------------------------------------- report


def tables(config, eval_csvs: dict, timing_csvs: dict, model_paths: dict, out_dir) -> None:
    from .report import ablation_table, accuracy_table, speed_table, write_table

    evals = pd.concat([pd.read_csv(p) for p in eval_csvs.values()], ignore_index=True)
    speed = pd.concat([pd.read_csv(p).assign(method=m) for m, p in timing_csvs.items()], ignore_index=True)
    speed = speed[["method"] + [c for c in speed.columns if c != "method"]]
    settings = RunSettings.from_config(config)
    grid = settings.grid
    params = {m: complexity(load_model(p)[0], grid)["parameters"] for m, p in model_paths.items()}
    params["identity"] = params[ANTS] = 0
    params["affine"] = sum(x.numel() for x in load_model(model_paths["teacher"])[0].affine.parameters())
    accuracy = accuracy_table(evals, speed, params)
    for method, path in model_paths.items():  # a training that ended at its last good state says so
        diverged = read_model_file(path)["training"].get("diverged")
        if diverged and "flag" in accuracy:
            note = (f"training diverged at step {diverged['step']} ({diverged['symptom']}); "
                    f"model from step {diverged['kept_step']}")
            rows = accuracy.method == method
            accuracy.loc[rows, "flag"] = ["; ".join(filter(None, [f, note])) for f in accuracy.loc[rows, "flag"]]
    out_dir = Path(out_dir)
    write_table(accuracy.assign(seed=settings.seed), out_dir / "accuracy")
    # the speed profile's reference model is the recommended student
    student = settings.speed_profile.reference_model or "student_aldk"
    write_table(speed_table(speed, student=student), out_dir / "speed")
    # the students this target trained (`all`: the headline ones; `ablation`: every one)
    variants = {v: s for v, s in resolved_variants(config).items() if f"student_{v}" in model_paths}
    write_table(ablation_table(accuracy, variants, evals), out_dir / "ablation")


def resolved_variants(config: dict) -> dict:
    """Each switched-on student variant's network and training settings as trained: the
    variant's own over the students' defaults over the code's defaults."""
    out = {}
    for name, own in config["students"]["variants"].items():
        if own is None:
            continue
        spec, cfg = student_settings(config, name)
        out[name] = {**spec.to_dict(), **cfg.to_dict(),
                     "targets": student_targets(config, name) or "none"}
    return out


def figures(config, eval_csvs: dict, accuracy_csv, loss_csvs: dict, model_paths: dict, subjects_csv, pairs_csv, out_dir,
            validation_csvs: dict | None = None) -> None:
    from .report import accuracy_vs_time, dice_boxplot, learning_curves, qualitative_panel, training_curves

    out_dir = Path(out_dir)
    evals = pd.concat([pd.read_csv(p) for p in eval_csvs.values()], ignore_index=True)
    dice_boxplot(evals, out_dir / "dice_boxplot.png")
    accuracy_vs_time(pd.read_csv(accuracy_csv), out_dir / "accuracy_vs_time.png")
    training_curves({m: pd.read_csv(p) for m, p in loss_csvs.items()}, out_dir / "training_curves.png")
    learning_curves({m: pd.read_csv(p) for m, p in (validation_csvs or {}).items()}, out_dir / "learning_curves.png")
    subjects = pd.read_csv(subjects_csv).set_index("id")
    pair = pd.read_csv(pairs_csv).query("split == 'test'").iloc[0]
    load = lambda p, t: np.asarray(nib.load(p).dataobj).astype(t)
    moving, fixed = load(subjects.loc[pair.moving, "image"], np.float32), load(subjects.loc[pair.fixed, "image"], np.float32)
    has_labels = isinstance(subjects.loc[pair.moving, "labels"], str)
    mov_lab = load(subjects.loc[pair.moving, "labels"], np.int32) if has_labels else None
    fix_lab = load(subjects.loc[pair.fixed, "labels"], np.int32) if has_labels else None
    results = {}
    with torch.inference_mode():
        for name, path in model_paths.items():
            model = load_model(path)[0]
            m, f = torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None]
            flow = model(m, f, warp=False)["flow"]
            wl = warp_labels(torch.from_numpy(mov_lab)[None, None], flow)[0, 0].numpy() if has_labels else None
            results[name] = (warp_image(m, flow)[0, 0].numpy(), wl, flow[0].numpy())
    qualitative_panel(moving, fixed, fix_lab, results, out_dir / "qualitative.png")


def run_job(log_path, threads, job, *args, **kwargs) -> None:
    """Run one workflow job with logging set up; bad input ends it with a one-line reason
    (the full trace stays in the log for anything unexpected)."""
    setup_logging(log_path, threads)
    try:
        job(*args, **kwargs)
    except (InputError, ValueError) as exc:
        log.error("%s", exc)
        raise SystemExit(f"error: {exc}") from None
    except Exception:
        log.exception("unexpected failure")  # the trace goes to the job's log, not only to stderr
        raise


def benchmark_core(config, out_csv) -> None:
    from .benchmark import core_benchmark

    b = RunSettings.from_config(config).benchmark
    frame = core_benchmark(b.repeats, tuple(b.grid))
    log.info("\n%s", frame.to_string(index=False))
    write_csv(frame, out_csv)


def speed_profile(config, model_paths: dict, subjects_csv, pairs_csv, profile_csv, machine_csv) -> None:
    """``results/tables/speed_profile`` and ``speed_machine`` (CSV + Markdown)."""
    from .report import write_table

    from .speed_profile import speed_profile as profile

    problems = speed_profile_problems(config["speed_profile"], list(model_paths))
    if problems:
        raise ValueError("; ".join(problems))
    settings = RunSettings.from_config(config)
    sp = settings.speed_profile
    pairs = pd.read_csv(pairs_csv)
    counts = sorted({usable_threads(n) for n in sp.threads})
    grids = [settings.grid] + [tuple(g) for g in sp.extra_grids]
    repeats = sp.repeats
    if not sp.full:  # the short form in `all`: the default grid, the most threads, 3 runs
        grids, counts, repeats = grids[:1], counts[-1:], min(repeats, 3)
        log.info("short speed profile (speed_profile.full: false): grid %s, %d threads, %d runs", grids[0], counts[0],
                 repeats)
    table, machine = profile(model_paths, sp.engines, grids, counts, repeats, sp.warmup,
                             pd.read_csv(subjects_csv), pairs[pairs.split == "test"], settings.spacing_mm,
                             sp.reference_engine, sp.baseline_model, sp.reference_model, settings.seed,
                             sp.native_inputs, sp.ants_repeats, settings.greedy, sp.greedy_repeats)
    log.info("\n%s", table[["model", "engine", "grid", "input", "threads", "total_s", "network_s", "peak_rss_mb",
                             "dice"]].to_string())
    write_table(table, Path(profile_csv).with_suffix(""))
    write_table(machine, Path(machine_csv).with_suffix(""))
