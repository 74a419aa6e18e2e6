"""The whole DAG on a tiny config, the linter, and the SLURM profile (dry run)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny_config.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]


def _run(args, cwd, timeout=600):
    proc = subprocess.run(SNAKEMAKE + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    _run(["all", "--cores", "2", "--configfile", str(TINY), "--config", f"results_dir={work}/results",
          f"resources_dir={work}/resources"], cwd=work, timeout=900)
    return work / "results"


def test_every_table_and_figure_exists_with_sane_values(tiny_run):
    for stem in ("accuracy", "speed", "ablation"):
        assert (tiny_run / "tables" / f"{stem}.csv").exists() and (tiny_run / "tables" / f"{stem}.md").exists()
    for name in ("qualitative", "dice_boxplot", "accuracy_vs_time", "training_curves"):
        assert (tiny_run / "figures" / f"{name}.png").stat().st_size > 10_000
    acc = pd.read_csv(tiny_run / "tables" / "accuracy.csv").set_index("method")
    assert set(acc.index) >= {"identity", "affine", "teacher", "student_unsupervised", "student_distill", "student_aldk",
                              "peer_voxelmorph", "peer_ants_syn"}
    assert acc.dice_mean.between(0, 1).all()
    # A few dozen CPU steps on 6 mm volumes leave each network's Dice within run-to-run noise of
    # no registration (thread scheduling changes float sums, hence the trajectory), so per-model
    # Dice is not asserted: every network's similarity loss must fall, and the best trained
    # network must beat no registration. Per-model learning is asserted in test_networks.py.
    trained = ["teacher", "student_unsupervised", "student_distill", "student_aldk", "peer_voxelmorph"]
    assert acc.loc[trained, "dice_mean"].max() > acc.loc["identity", "dice_mean"] + 0.01
    # ALDK is left out: with gamma = 0.3 on similarity its similarity barely moves here (0.325 ->
    # 0.320 in one run), the same finding as the README's default run
    for name in [n for n in trained if n != "student_aldk"]:
        log = pd.read_csv(tiny_run / "training" / f"{name}_loss.csv")
        fifth = len(log) // 5
        assert log.similarity.iloc[-fifth:].mean() < 0.9 * log.similarity.iloc[:fifth].mean(), name
    assert (acc.folding_percent >= 0).all() and acc.seed.eq(1).all()
    speed = pd.read_csv(tiny_run / "tables" / "speed.csv")
    assert (speed.seconds.dropna() > 0).all() and set(speed.threads.dropna()) >= {1}
    aldk = speed[speed.method == "student_aldk"]
    assert np.allclose(aldk.time_ratio_to_aldk_student, 1.0)
    if "note" in acc.columns and isinstance(acc.loc["peer_ants_syn", "note"], str):
        assert "not installed" in acc.loc["peer_ants_syn", "note"]  # skipped, and says so
    else:
        assert acc.loc["peer_ants_syn", "dice_mean"] > acc.loc["identity", "dice_mean"]
    ablation = pd.read_csv(tiny_run / "tables" / "ablation.csv")
    assert list(ablation.variant) == ["unsupervised", "distill", "aldk"]
    losses = pd.read_csv(tiny_run / "training" / "student_aldk_loss.csv")
    assert {"critic", "wasserstein", "adversarial"} <= set(losses.columns)
    assert (tiny_run / "logs" / "train_teacher.log").read_text().count("it/s") > 0
    assert (tiny_run / "benchmarks" / "train_teacher.tsv").exists()


def test_speed_profile_covers_every_configuration_and_guards_accuracy(tiny_run):
    profile = pd.read_csv(tiny_run / "tables" / "speed_profile.csv")
    assert (tiny_run / "tables" / "speed_profile.md").exists()
    # tiny config: 2 models x 2 engines x 1 grid x threads {1, 2} (capped at the machine's cores)
    assert set(profile.model) == {"teacher", "student_aldk"} and set(profile.engine) == {"float32", "bfloat16_cl"}
    assert len(profile) == 4 * profile.threads.nunique()
    stages = profile[["preprocess_s", "network_s", "warp_s", "write_s"]]
    assert (stages > 0).all().all()
    np.testing.assert_allclose(profile.total_s, stages.sum(axis=1), rtol=0.5)  # medians of sums vs sums of medians
    assert (profile.peak_rss_mb > 100).all() and (profile.gflops > 0).all()
    assert profile.dice.between(0, 1).all()
    reference = profile[profile.engine == "float32"]
    assert (reference.dice_change_vs_reference == 0).all()
    teacher = reference[reference.model == "teacher"]
    np.testing.assert_allclose(teacher.speedup_vs_baseline, 1.0)
    # the student has fewer FLOPs than the teacher on the same grid
    by_model = profile.groupby("model").gflops.first()
    assert by_model["student_aldk"] < by_model["teacher"]
    machine = pd.read_csv(tiny_run / "tables" / "speed_machine.csv")
    assert (machine.gflops_per_s > 0).all() and {"float32", "bfloat16"} <= set(machine.dtype)


def test_forcing_one_variant_reruns_only_it_and_its_dependents(tiny_run):
    work = tiny_run.parent
    proc = _run(["all", "-n", "--cores", "2", "--forcerun", str(tiny_run / "models" / "student_distill.pt"),
                 "--configfile", str(TINY), "--config", f"results_dir={work}/results", f"resources_dir={work}/resources"],
                cwd=work)
    out = proc.stdout + proc.stderr
    assert "variant=distill" in out
    assert "variant=aldk" not in out and "variant=unsupervised" not in out
    assert "rule train_teacher" not in out and "rule preprocess" not in out
    assert "method=student_distill" in out and "method=teacher" not in out


@pytest.mark.parametrize("text, message", [
    ("teacher: {cascades: 0}\n", "0 is less than the minimum of 1"),
    ("unknown_key: 1\n", "'unknown_key' was unexpected"),
    ("pairs: {train: many}\n", "'many' is not of type 'integer'"),
])
def test_config_errors_are_reported_at_start(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    proc = subprocess.run(SNAKEMAKE + ["-n", "--configfile", str(bad)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


def test_lint_passes():
    proc = subprocess.run(SNAKEMAKE + ["--lint"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                    reason="snakemake-executor-plugin-slurm not installed ([slurm] extra)")
def test_slurm_profile_dry_run(tmp_path):
    _run(["all", "-n", "--workflow-profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--configfile", str(TINY),
          "--config", f"results_dir={tmp_path}/results", f"resources_dir={tmp_path}/resources"], cwd=tmp_path)
