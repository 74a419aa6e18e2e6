"""Measured numbers in the docs come from the run's tables: ``ldreg docs`` renders the headline
tables from ``results/tables/*.csv`` and writes them between markers in Markdown files

    <!-- begin generated: NAME -->  ...  <!-- end generated: NAME -->

so that a rerun regenerates them and nothing is copied by hand. Blocks: ``real`` (the real
anatomy at 1 mm), ``native`` (the default cohort's test pairs at their own resolution),
``grid`` (the model's grid), ``speed`` (the register path end to end at the scan's resolution),
``cpu`` (the machine every number was measured on), and ``md_<stem>`` for any table as the run
wrote it (``results/tables/<stem>.md``)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

BLOCK = re.compile(r"(<!-- begin generated: (\w+) -->\n)(.*?)(<!-- end generated: \2 -->)", re.S)


def _fmt(value, digits: int = 3, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _seconds(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def native_block(table: pd.DataFrame) -> str:
    """Dice, gain over no registration, HD95, folding, seconds end to end; best Dice first."""
    rows = table.dropna(subset=["dice_mean"]).sort_values("dice_mean", ascending=False)
    first = rows.iloc[0]
    lines = [f"| method ({first['shape']} at {first.spacing_mm:g} mm) | Dice | gain over none | HD95 mm | "
             f"folding % | s a pair, {int(first.threads)} threads | pairs |", "|:--|--:|--:|--:|--:|--:|--:|"]
    for r in rows.itertuples():
        name = f"{r.method} (flagged: {r.flag})" if isinstance(r.flag, str) and r.flag else r.method
        lines.append(f"| {name} | {r.dice} | {_fmt(r.dice_gain, 3)} | {_fmt(r.hd95_mm, 2)} | "
                     f"{_fmt(r.folding_percent, 3)} | {_seconds(r.seconds)} | {r.pairs} |")
    for r in table[table.dice_mean.isna()].itertuples():  # skipped peers, and why
        lines.append(f"| {r.method} | {r.flag} | | | | | |")
    return "\n".join(lines)


def grid_block(table: pd.DataFrame) -> str:
    rows = table.dropna(subset=["dice_mean"]).sort_values("dice_mean", ascending=False)
    lines = ["| method (model grid, 3 mm) | Dice | EPE mm | folding % | s a pair, 1 thread |", "|:--|--:|--:|--:|--:|"]
    for r in rows.itertuples():
        name = f"{r.method} (flagged: {r.flag})" if isinstance(getattr(r, "flag", ""), str) and r.flag else r.method
        lines.append(f"| {name} | {r.dice} | {_fmt(getattr(r, 'epe_mm', np.nan), 2)} | {_fmt(r.folding_percent, 3)} | "
                     f"{_seconds(r.cpu_s_per_pair)} |")
    return "\n".join(lines)


def speed_block(profile: pd.DataFrame) -> str:
    """The register path at the scan's own resolution, per model / peer, stage by stage."""
    native = profile[(profile.input != "on the model grid") & profile.total_s.notna()]
    lines = ["| what | engine | input | threads | total s | network s | warp s | write s | vs ANTs SyN |",
             "|:--|:--|:--|--:|--:|--:|--:|--:|--:|"]
    for r in native.itertuples():
        lines.append(f"| {r.model} | {r.engine} | {r.input} | {int(r.threads)} | {_seconds(r.total_s)} | "
                     f"{_fmt(r.network_s, 3)} | {_fmt(r.warp_s, 3)} | {_fmt(r.write_s, 3)} | "
                     f"{_fmt(r.speedup_vs_ants_syn, 1, 'x')} |")
    return "\n".join(lines)


def render_blocks(results_dir) -> dict:
    tables = Path(results_dir) / "tables"
    blocks = {}
    for name, stem in (("real", "accuracy_real"), ("native", "accuracy_native")):
        if (tables / f"{stem}.csv").exists():
            table = pd.read_csv(tables / f"{stem}.csv")
            blocks[name] = native_block(table)
            blocks.setdefault("cpu", str(table.cpu.dropna().iloc[0]))
    if (tables / "accuracy.csv").exists():
        blocks["grid"] = grid_block(pd.read_csv(tables / "accuracy.csv"))
    if (tables / "speed_profile.csv").exists():
        blocks["speed"] = speed_block(pd.read_csv(tables / "speed_profile.csv"))
    for md in sorted(tables.glob("*.md")):  # any whole table as the run wrote it: block md_<stem>
        blocks[f"md_{md.stem}"] = md.read_text().rstrip("\n")
    return blocks


def update_markdown(path, blocks: dict) -> list[str]:
    """Replace each generated block of ``path`` whose name ``blocks`` holds; returns the names
    replaced. A block the file names but the run did not produce is left as it is."""
    text = Path(path).read_text()
    done = []

    def swap(match):
        name = match.group(2)
        if name not in blocks:
            return match.group(0)
        done.append(name)
        return f"{match.group(1)}{blocks[name]}\n{match.group(4)}"

    Path(path).write_text(BLOCK.sub(swap, text))
    return done
