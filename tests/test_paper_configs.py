"""The paper-scale configs (config/paper_*.yaml): each passes the schema and builds its DAG (dry
run); they differ only in their data, and the teacher and ALDK student they configure (cascades,
depth, batch size, losses) train two steps on a tiny grid."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import blob_volume
from ldreg.config_checks import student_targets
from ldreg.pipeline import _spec, student_settings
from ldreg.settings import merged
from ldreg.training import FlowCache, TrainConfig, cache_teacher_flows, train
from ldreg.networks import build_network

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((ROOT / "config").glob("paper_*.yaml"))


def _merged(path) -> dict:
    """config.yaml with ``path`` over it, as ``snakemake --configfile`` merges them."""
    return merged(yaml.safe_load((ROOT / "config.yaml").read_text()), yaml.safe_load(Path(path).read_text()))


def test_both_paper_configs_ship():
    assert {p.name for p in PAPER_CONFIGS} >= {"paper_liver.yaml", "paper_oasis.yaml"}


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_dry_run(path, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "all", "-n", "--cores", "2",
                           "--configfile", str(path), "--config", f"results_dir={tmp_path}/results",
                           f"resources_dir={tmp_path}/resources"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "train_teacher" in proc.stdout and "download_dataset" in proc.stdout


def test_paper_configs_differ_only_in_their_data():
    # so that the two-step smoke test below, run on one of them, covers both
    liver, oasis = (_merged(ROOT / "config" / f"paper_{n}.yaml") for n in ("liver", "oasis"))
    for key in ("teacher", "students", "peers", "evaluation", "pairs", "device"):
        assert liver[key] == oasis[key], key
    assert liver["preprocessing"]["grid"] == oasis["preprocessing"]["grid"]
    assert (liver["data"]["source"], oasis["data"]["source"]) == ("msd_liver", "oasis")


def test_paper_config_trains_two_steps_on_a_tiny_grid(tmp_path):
    config = _merged(ROOT / "config" / "paper_liver.yaml")
    assert config["preprocessing"]["grid"] == [128, 128, 128] and config["teacher"]["cascades"] == 10
    images, rows = {}, []
    for i in range(3):
        image, _ = blob_volume((32, 32, 32), centre=[16 + i, 15, 16 - i], radius=8 + i)
        images[f"s{i}"] = torch.from_numpy(image.astype(np.float32))[None, None]
    for a in images:
        for b in images:
            if a != b:
                rows.append({"pair_id": f"{a}_{b}", "moving": a, "fixed": b})
    pairs = pd.DataFrame(rows)

    def two_steps(train_cfg):
        cfg = TrainConfig.from_dict({**train_cfg, "steps": 2, "seed": 0})
        assert cfg.batch_size == 4  # the paper's
        return cfg

    teacher = build_network(_spec("teacher", config["teacher"]))
    assert len(teacher.stages) == 10
    result = train(teacher, pairs, images, two_steps(config["teacher"]["train"]), tmp_path / "t.ckpt",
                   show_progress=False, name="teacher")
    teacher, losses = result.model, result.losses
    assert len(losses) == 2 and np.isfinite(losses.loss).all()
    cache_teacher_flows(teacher, pairs, images, tmp_path / "flows.pt")
    spec, cfg = student_settings(config, "aldk")
    cfg = two_steps(cfg.to_dict())
    assert cfg.adversarial and cfg.gamma == 0.3 and cfg.gp_weight == 0.1 and cfg.similarity == "correlation"
    # the paper's loss and targets, not config.yaml's variant of the same name that the file updates
    assert cfg.adversarial_target == "unbounded" and cfg.similarity_weight == 1.0 and cfg.adversarial_weight == 1.0
    assert student_targets(config, "aldk") == "raw" and config["teacher_cache"]["refine"]["steps"] == 0
    student = build_network(spec)
    result = train(student, pairs, images, cfg, tmp_path / "s.ckpt", FlowCache(tmp_path / "flows.pt"),
                   show_progress=False, name="student_aldk")
    student, losses, critic = result.model, result.losses, result.critic
    assert critic is not None and len(losses) == 2
    assert np.isfinite(losses[["loss", "adversarial", "critic"]].to_numpy()).all()
