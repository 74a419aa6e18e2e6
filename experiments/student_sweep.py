"""Experiment: student variants trained side by side, each scored on the validation pairs every
N steps (learning curve) and on the test pairs at the end.

    python experiments/student_sweep.py SWEEP.yaml OUT_DIR [--results results]
        [--jobs 4] [--threads 1] [--device auto] [--teacher-flows CACHE.pt]

SWEEP.yaml names a run config (``base``), the steps and validation interval, and the variants:
each is a student override exactly as under ``students.variants`` in the config (network keys
and a ``train`` section), merged over the base's ``students.defaults``. The default run's data
(``<results>/data``) and teacher (``<results>/models/teacher.pt``) are read; the teacher's fields
for the training pairs are computed once (or read from ``<results>/cache/teacher_flows.pt``).
Dice and folding are always scored; EPE only where the subjects' true fields are present.

Writes, as each variant ends (so that a stopped sweep keeps what finished): OUT_DIR/summary.csv
(one row per variant: test Dice, EPE, folding, steps, restarts, wall and CPU seconds, device),
OUT_DIR/validation.csv (every variant's learning curve), OUT_DIR/<variant>_pairs.csv (its test
pairs, for paired tests) and OUT_DIR/<variant>.log.
Not part of `all`: a research tool (docs/experiments.md has the figures and the machine)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd
import torch
import yaml

from ldreg.config_checks import student_uses_teacher
from ldreg.engines import cpu_summary
from ldreg.evaluate import evaluate_pairs, summary, validator
from ldreg.io import InputError, write_csv
from ldreg.modelfile import load_model
from ldreg.pipeline import training_inputs, student_settings
from ldreg.networks import build_network
from ldreg.engines import device_for
from ldreg.training import FlowCache, cache_teacher_flows, train


SWEEP_SCHEMA = Path(__file__).with_name("sweep.schema.yaml")
CONFIG_SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def load_sweep(path: Path) -> tuple[dict, dict]:
    """(sweep, base config) of SWEEP.yaml, both checked: the sweep against sweep.schema.yaml,
    the base config with each variant merged in against the workflow's config schema. A problem
    is an InputError naming the file, the variant and the key."""
    import jsonschema

    def problems(document, schema_path) -> list[str]:
        schema = yaml.safe_load(schema_path.read_text())
        found = jsonschema.Draft202012Validator(schema).iter_errors(document)
        # best_match goes down into "one of these schemas" to the key that is wrong
        found = [jsonschema.exceptions.best_match([e]) for e in found]
        return [f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in found]

    sweep = yaml.safe_load(path.read_text())
    found = problems(sweep, SWEEP_SCHEMA)
    if found:
        raise InputError(f"{path}: not a sweep ({SWEEP_SCHEMA.name}): " + "; ".join(found))
    base = Path(sweep["base"])
    if not base.exists():
        raise InputError(f"{path}: base config {base} not found (paths are relative to the folder you run in)")
    config = yaml.safe_load(base.read_text())
    for name, override in sweep["variants"].items():
        merged = {**config, "students": {**config["students"], "variants": {name: override or {}}}}
        found = problems(merged, CONFIG_SCHEMA)
        if found:
            raise InputError(f"{path}: variant {name}: " + "; ".join(found))
    return sweep, config


def _data(results: Path):
    subjects = pd.read_csv(results / "data" / "subjects.csv")
    pairs = pd.read_csv(results / "data" / "pairs.csv")
    # EPE needs the true fields; a copy of the data without them is scored on Dice alone
    has_truth = "true_forward" in subjects and all(Path(p).exists() for p in subjects.true_forward)
    if not has_truth:
        subjects = subjects.drop(columns=["true_forward", "true_inverse"], errors="ignore")
    return subjects, pairs


def _flow_cache(results: Path, out_dir: Path, device: str) -> Path:
    cached = results / "cache" / "teacher_flows.pt"
    if cached.exists():
        return cached
    images, train_pairs = training_inputs(results / "data" / "subjects.csv", results / "data" / "pairs.csv")
    teacher, _, _ = load_model(results / "models" / "teacher.pt", device)
    path = out_dir / "teacher_flows.pt"
    t = time.perf_counter()
    cache_teacher_flows(teacher, train_pairs, images, path, device)
    print(f"teacher fields for {len(train_pairs)} pairs in {time.perf_counter() - t:.1f} s on {device}", flush=True)
    return path


def run_variant(name: str, override: dict, config: dict, sweep: dict, results: str, cache_path: str, out_dir: str,
                device: str, threads: int) -> tuple[dict, pd.DataFrame]:
    torch.set_num_threads(threads)
    results, out_dir = Path(results), Path(out_dir)
    logging.basicConfig(filename=out_dir / f"{name}.log", level=logging.INFO, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = {**config, "students": {**config["students"], "variants": {name: override}}}
    spec, cfg = student_settings(config, name)
    # the sweep's steps and validation interval over the base's, a variant's own steps over both
    cfg = dataclasses.replace(cfg, validate_every=sweep["validate_every"],
                              steps=override.get("train", {}).get("steps", sweep["steps"]))
    subjects, pairs = _data(results)
    images, train_pairs = training_inputs(results / "data" / "subjects.csv", results / "data" / "pairs.csv")
    cache = FlowCache(cache_path) if student_uses_teacher(config, name) else None
    spacing = config["preprocessing"]["spacing_mm"]
    validate = validator(subjects, pairs[pairs.split == "val"].head(config["evaluation"]["validation_pairs"]),
                         spacing, device)
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = train(build_network(spec, seed=cfg.seed), train_pairs, images, cfg, out_dir / f"{name}.ckpt", cache,
                   device, show_progress=False, validate=validate, name=name)
    model, val_log = result.model, result.validation
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    (out_dir / f"{name}.ckpt").unlink(missing_ok=True)
    test = pairs[pairs.split == "test"]
    predict = lambda m, f: model(m.to(device), f.to(device), warp=False)["flow"].float().cpu()
    per_pair, _ = evaluate_pairs(name, predict, subjects, test, spacing, with_hd95=False, show_progress=False)
    write_csv(per_pair, out_dir / f"{name}_pairs.csv")  # for paired tests against other runs' rows
    stopped = val_log["stopped"].iloc[-1] if len(val_log) and "stopped" in val_log else ""
    row = {"variant": name, **{f"test_{k}": v for k, v in summary(per_pair).items()},
           "best_val_dice": float(val_log.dice.max()) if "dice" in val_log else float("nan"),
           "steps": cfg.steps, "restarts": int(val_log["restarts"].iloc[-1]) if len(val_log) else 0,
           "stopped": stopped, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "device": device,
           "threads": threads, "teacher_flows": str(cache_path) if cache else "", "override": repr(override)}
    return row, val_log.assign(variant=name)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", nargs="*", help="run these variants of the sweep only")
    ap.add_argument("--teacher-flows", type=Path,
                    help="a flow cache to teach from instead of <results>/cache/teacher_flows.pt "
                         "(e.g. cache/teacher_flows_refined.pt)")
    args = ap.parse_args(argv)
    sweep, config = load_sweep(args.sweep)
    variants = {k: (v or {}) for k, v in sweep["variants"].items() if not args.only or k in args.only}
    device = str(device_for(args.device))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(variants)} variants, {args.jobs} at a time, {args.threads} thread(s) each, on {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else cpu_summary()})", flush=True)
    cache_path = args.teacher_flows or _flow_cache(args.results, args.out_dir, device)
    print(f"teacher fields from {cache_path}", flush=True)
    rows, curves = [], []
    # spawn: CUDA cannot be used in forked workers
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_variant, name, override, config, sweep, str(args.results), str(cache_path),
                               str(args.out_dir), device, args.threads): name for name, override in variants.items()}
        for future in as_completed(futures):
            try:
                row, curve = future.result()
            except Exception as exc:  # one failed variant must not lose the others
                row, curve = {"variant": futures[future], "stopped": f"failed: {exc}"}, pd.DataFrame()
            rows.append(row)
            curves.append(curve)
            print({k: row.get(k) for k in ("variant", "test_dice", "test_epe_mm", "best_val_dice", "steps",
                                           "restarts", "stopped", "wall_s")}, flush=True)
            write_csv(pd.DataFrame(rows), args.out_dir / "summary.csv")
            write_csv(pd.concat(curves, ignore_index=True), args.out_dir / "validation.csv")


if __name__ == "__main__":
    main()
