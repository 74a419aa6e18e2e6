"""Registering many pairs in one process (``ldreg register-batch``): the model loaded once, the
next pair read while the current one registers and the last one's files are written, pairs
whose outputs are complete skipped (a batch killed half-way resumes where it stopped), one bad
input reported in the summary without stopping the others.

Per pair, under ``out_dir/<pair_id>/``: ``warped``, ``field`` (as ITK reads it, see
:func:`ldreg.io.field_to_itk_array`), ``warped_labels`` when the pair has moving labels, an
optional ``qc.png`` (:mod:`ldreg.qc`) and ``result.json``, written last: a pair is complete when
it exists and names the model and refinement of this run (:func:`settings_of`). Over the batch: ``summary.csv`` / ``summary.md`` (status, seconds per stage,
folding, Dice where both label maps are given) and, with pictures, ``report.md``."""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .io import InputError, atomic_path, load_volume, write_csv
from .metrics import dice_per_label, jacobian_determinant
from .progress import progress

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class BatchPair:
    pair_id: str
    moving: str
    fixed: str
    moving_labels: str | None = None
    fixed_labels: str | None = None


def _stem(path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def pairs_from_csv(path) -> list[BatchPair]:
    """Pairs from a CSV with columns ``moving`` and ``fixed`` (and optionally ``pair_id``,
    ``moving_labels``, ``fixed_labels``); relative paths are read from the CSV's folder, or
    else from the working folder."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: not a readable CSV of pairs ({exc})") from None
    missing = {"moving", "fixed"} - set(table.columns)
    if missing:
        raise InputError(f"{path}: a pairs CSV needs the columns 'moving' and 'fixed' (missing: {sorted(missing)})")
    if table.empty:
        raise InputError(f"{path}: no pairs in the CSV")
    def resolve(value):
        # relative to the CSV's folder, or else to the working folder (the workflow's own
        # manifests name files from the project's root); a file in neither is reported when read
        if not value or Path(value).is_absolute():
            return value or None
        beside = path.parent / value
        return str(beside if beside.exists() or not Path(value).exists() else Path(value))

    pairs = []
    for row in table.itertuples(index=False):
        row = row._asdict()
        pair_id = row.get("pair_id") or _stem(row["moving"])
        pairs.append(BatchPair(pair_id, resolve(row["moving"]), resolve(row["fixed"]),
                               resolve(row.get("moving_labels", "")), resolve(row.get("fixed_labels", ""))))
    _check_unique(pairs, path)
    return pairs


def pairs_from_folder(moving_dir, fixed, pattern: str = "*.nii*") -> list[BatchPair]:
    """Every NIfTI file of ``moving_dir`` matching ``pattern`` registered to one ``fixed``
    image (a template), named by its file name."""
    moving_dir = Path(moving_dir)
    if not moving_dir.is_dir():
        raise InputError(f"{moving_dir}: not a folder")
    files = sorted(p for p in moving_dir.glob(pattern) if p.name.endswith(NIFTI_SUFFIXES) and p.is_file())
    if not files:
        raise InputError(f"{moving_dir}: no NIfTI file matches {pattern!r}")
    pairs = [BatchPair(_stem(p), str(p), str(fixed)) for p in files]
    _check_unique(pairs, moving_dir)
    return pairs


def batch_pairs(pairs_csv=None, moving_dir=None, fixed=None, pattern: str = "*.nii*") -> list[BatchPair]:
    """The pairs of a batch: a CSV of pairs, or a folder of scans registered to ``fixed``."""
    if bool(pairs_csv) == bool(moving_dir):
        raise InputError("a batch is either a CSV of pairs or a folder of moving scans with a fixed image")
    if moving_dir and not fixed:
        raise InputError(f"{moving_dir}: a folder of moving scans needs the fixed image every scan is registered to")
    return pairs_from_csv(pairs_csv) if pairs_csv else pairs_from_folder(moving_dir, fixed, pattern)


def _check_unique(pairs, source) -> None:
    seen = set()
    for pair in pairs:
        if pair.pair_id in seen:
            raise InputError(f"{source}: pair id {pair.pair_id!r} appears twice (its outputs would overwrite each other)")
        seen.add(pair.pair_id)


@dataclass
class BatchOptions:
    suffix: str = ".nii.gz"  # of every image written: .nii.gz or .nii
    qc: bool = False
    write_field: bool = True
    # with more than one pair to register: image, labels and field through the compiled kernels
    # (their ~0.5 s load repaid after a few pairs; off: torch's passes, as `register` does)
    compiled_warp: bool = True


def _outputs(pair: BatchPair, pair_dir: Path, options: BatchOptions) -> dict:
    out = {"warped": pair_dir / f"warped{options.suffix}"}
    if options.write_field:
        out["field"] = pair_dir / f"field{options.suffix}"
    if pair.moving_labels:
        out["warped_labels"] = pair_dir / f"warped_labels{options.suffix}"
    if options.qc:
        out["qc"] = pair_dir / "qc.png"
    return out


def settings_of(registrar) -> dict:
    """What a pair's outputs depend on besides its files: the model file (path, size, time) and
    the refinement; a pair registered with other settings is done again."""
    model = Path(registrar.model_path)
    stat = model.stat()
    return {"model": str(model.resolve()), "model_bytes": stat.st_size, "model_mtime_ns": stat.st_mtime_ns,
            "refine_levels": [list(level) for level in registrar.refine_levels], "upto": registrar.upto}


def completed(pair: BatchPair, out_dir, options: BatchOptions, settings: dict | None = None) -> dict | None:
    """The record of a pair whose outputs are all there (``result.json`` last) and were made
    with ``settings``, else None."""
    pair_dir = Path(out_dir) / pair.pair_id
    marker = pair_dir / "result.json"
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not all(p.exists() for p in _outputs(pair, pair_dir, options).values()):
        return None
    if settings is not None and record.get("settings") != settings:
        return None
    return record


def _score(pair: BatchPair, result: dict) -> dict:
    """Folding (and Dice where both label maps are given) of a registered pair."""
    det = jacobian_determinant(result["field"], dtype=torch.float32)
    record = {"folding_percent": float((det <= 0).mean() * 100)}
    if pair.moving_labels and pair.fixed_labels:
        fixed_labels, _ = load_volume(pair.fixed_labels, "labels")
        if fixed_labels.shape != result["warped_labels"].shape:
            raise InputError(f"{pair.fixed_labels}: label map {fixed_labels.shape} is not on the grid of "
                             f"{pair.fixed} {result['warped_labels'].shape}")
        dice = dice_per_label(result["warped_labels"], fixed_labels, np.unique(fixed_labels))
        record["dice"] = float(np.nanmean(list(dice.values())))
    return record, det


def _finish(pair: BatchPair, result: dict, out_dir: Path, options: BatchOptions, settings: dict) -> dict:
    """Write one pair's files, score it and write its ``result.json`` last."""
    from .qc import qc_figure
    from .register import write_outputs

    pair_dir = out_dir / pair.pair_id
    outputs = _outputs(pair, pair_dir, options)
    t = time.perf_counter()
    write_outputs(result, outputs["warped"], outputs.get("field"), outputs.get("warped_labels"))
    times = {**result["times"], "write": time.perf_counter() - t}
    record, det = _score(pair, result)
    if options.qc:
        fixed_img = result["fixed_img"]
        qc_figure(np.asanyarray(fixed_img.dataobj, dtype=np.float32), result["warped"], det,
                  fixed_img.header.get_zooms()[:3], outputs["qc"], title=pair.pair_id)
    record = {"pair_id": pair.pair_id, "status": "ok", "moving": pair.moving, "fixed": pair.fixed,
              "seconds": sum(times.values()), **{f"{k}_s": v for k, v in times.items()}, **record,
              "outputs": {k: str(v) for k, v in outputs.items()}, "settings": settings}
    with atomic_path(pair_dir / "result.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record


def _failed(records: dict, pair: BatchPair, exc: Exception) -> None:
    log.error("%s: %s", pair.pair_id, exc)
    records[pair.pair_id] = {"pair_id": pair.pair_id, "status": "error", "error": str(exc), "moving": pair.moving,
                             "fixed": pair.fixed}


def register_batch(registrar, pairs: list[BatchPair], out_dir, options: BatchOptions | None = None,
                   show_progress: bool = True) -> pd.DataFrame:
    """Register ``pairs`` with one loaded :class:`ldreg.register.Registrar`; returns the
    summary (one row per pair, ``status`` ok / done before / error with the problem) and writes
    it as ``summary.csv`` and ``summary.md`` (and ``report.md`` with the pictures)."""
    options = options or BatchOptions()
    if options.suffix not in NIFTI_SUFFIXES:
        raise ValueError(f"output suffix must be one of {NIFTI_SUFFIXES}, got {options.suffix!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, todo = {}, []
    settings = settings_of(registrar)
    for pair in pairs:
        done = completed(pair, out_dir, options, settings)
        if done is not None:
            records[pair.pair_id] = {**done, "status": "done before"}
        else:
            todo.append(pair)
    if records:
        log.info("%d of %d pairs complete from an earlier run: skipped", len(records), len(pairs))
    if options.compiled_warp and len(todo) > 1 and not registrar.compiled_warp:
        registrar.use_compiled_warp()
    read = lambda p: registrar.read_pair(p.moving, p.fixed, p.moving_labels)
    started = time.perf_counter()
    # one pair read ahead and one pair's files written behind the one registering: reading
    # (inflate, percentiles) and writing (deflate) release the GIL and leave torch's threads busy
    def collect(written) -> None:
        pair, pending = written
        try:
            records[pair.pair_id] = pending.result()
        except (InputError, ValueError, OSError) as exc:
            _failed(records, pair, exc)

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        next_read, written = (reader.submit(read, todo[0]) if todo else None), None
        for i, pair in enumerate(progress(todo, desc="register-batch", logger=__name__, disable=not show_progress)):
            current, next_read = next_read, (reader.submit(read, todo[i + 1]) if i + 1 < len(todo) else None)
            try:
                result = registrar.register_read(current.result())
            except (InputError, ValueError, OSError) as exc:
                _failed(records, pair, exc)
                continue
            if written:  # one pair's files in flight at a time: memory stays that of two pairs
                collect(written)
            written = (pair, writer.submit(_finish, pair, result, out_dir, options, settings))
            del result
        if written:
            collect(written)
    wall = time.perf_counter() - started
    summary = pd.DataFrame([records[p.pair_id] for p in pairs]).drop(columns=["outputs", "settings"], errors="ignore")
    registered = int((summary.status == "ok").sum())
    log.info("registered %d pairs in %.1f s (%.2f s a pair end to end, reading and writing overlapped); "
             "%d done before, %d failed", registered, wall, wall / max(registered, 1),
             int((summary.status == "done before").sum()), int((summary.status == "error").sum()))
    write_summary(summary, out_dir, options.qc)
    return summary


def write_summary(summary: pd.DataFrame, out_dir: Path, with_pictures: bool) -> None:
    write_csv(summary, out_dir / "summary.csv")
    shown = summary.drop(columns=["moving", "fixed"], errors="ignore")
    table = shown.to_markdown(index=False, floatfmt=".3f")
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(f"# Registration batch\n\n{table}\n")
    if with_pictures:
        lines = ["# Registration batch: pictures", "", table, ""]
        for row in summary.itertuples():
            if row.status == "error":
                lines += [f"## {row.pair_id}: error", "", f"    {row.error}", ""]
                continue
            dice = f", Dice {row.dice:.3f}" if "dice" in summary and pd.notna(getattr(row, "dice", np.nan)) else ""
            lines += [f"## {row.pair_id}", "", f"{row.seconds:.2f} s, folding {row.folding_percent:.3f} %{dice}", "",
                      f"![{row.pair_id}]({row.pair_id}/qc.png)", ""]
        with atomic_path(out_dir / "report.md") as tmp:
            tmp.write_text("\n".join(lines))
