"""The whole DAG on a tiny config, the linter, and the SLURM profile (dry run, and the tiny DAG for
real on a one-node cluster the test starts)."""
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ldreg.guard import FOLDING_BOUND_PERCENT

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny_config.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]

pytestmark = pytest.mark.slow  # every test here runs Snakemake (the fast tier: pytest -m "not slow")


def running_rules(log: str) -> list[str]:
    """Rules Snakemake's log shows started (``rule X:`` ... ``jobid: N``) and not finished."""
    started = {m.group(2): m.group(1) for m in re.finditer(r"^\s*(?:local)?rule (\w+):\n(?:\s+\w+:.*\n)*?\s+jobid: (\d+)",
                                                           log, re.M)}
    for done in re.findall(r"Finished job(?:id)?:? (\d+)", log):
        started.pop(done, None)
    return sorted(set(started.values()))


class WorkflowTimeout(AssertionError):
    def __init__(self, message, process_group):
        super().__init__(message)
        self.process_group = process_group


def _group_alive(pgid) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _run(args, cwd, timeout=600, check=True):
    """Snakemake in its own process group: on a timeout the whole group (Snakemake, its jobs
    and their subprocesses) is killed, and the message says which rules were running."""
    proc = subprocess.Popen(SNAKEMAKE + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise WorkflowTimeout(f"snakemake {' '.join(args[:1])} timed out after {timeout} s while running rule(s) "
                              f"{', '.join(running_rules(stdout + stderr)) or '(none started)'}; its process group "
                              f"was killed\n{stderr[-3000:]}", proc.pid) from None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    _run(["all", "--cores", "2", "--configfile", str(TINY), "--config", f"results_dir={work}/results",
          f"resources_dir={work}/resources"], cwd=work, timeout=1500)
    return work / "results"


def test_every_table_and_figure_exists_with_sane_values(tiny_run):
    for stem in ("accuracy", "speed", "ablation"):
        assert (tiny_run / "tables" / f"{stem}.csv").exists() and (tiny_run / "tables" / f"{stem}.md").exists()
    for name in ("qualitative", "dice_boxplot", "accuracy_vs_time", "training_curves"):
        assert (tiny_run / "figures" / f"{name}.png").stat().st_size > 10_000
    acc = pd.read_csv(tiny_run / "tables" / "accuracy.csv").set_index("method")
    assert set(acc.index) >= {"identity", "affine", "teacher", "student_unsupervised", "student_aldk",
                              "peer_voxelmorph", "peer_ants_syn", "optimise5", "student_aldk+refine5"}
    assert "student_distill" not in acc.index  # not a headline variant: the `ablation` target's
    # per-pair optimisation: timed by its evaluation, and refining a field improves on it
    assert acc.loc[["optimise5", "student_aldk+refine5"], "cpu_s_per_pair"].gt(0).all()
    assert acc.loc["student_aldk+refine5", "dice_mean"] > acc.loc["student_aldk", "dice_mean"]
    assert "flag" in acc.columns
    assert acc.dice_mean.notna().all()  # every method scored on the test pairs
    # A few dozen CPU steps on 6 mm volumes leave each network's Dice within run-to-run noise of
    # no registration (thread scheduling changes float sums, hence the trajectory), so per-model
    # Dice is not asserted: every network's similarity loss must fall, and the best trained
    # network must beat no registration. Per-model learning is asserted in test_networks.py.
    trained = ["teacher", "student_unsupervised", "student_aldk", "peer_voxelmorph"]
    assert acc.loc[trained, "dice_mean"].max() > acc.loc["identity", "dice_mean"] + 0.01
    # ALDK is left out: with gamma = 0.3 on similarity its similarity barely moves here (0.325 ->
    # 0.320 in one run), the same finding as the README's default run
    for name in [n for n in trained if n != "student_aldk"]:
        log = pd.read_csv(tiny_run / "training" / f"{name}_loss.csv")
        fifth = len(log) // 5
        assert log.similarity.iloc[-fifth:].mean() < 0.9 * log.similarity.iloc[:fifth].mean(), name
    # the guard kept every trained network's validation folding under its bound; the test pairs too
    assert (acc.loc[trained, "folding_percent"] <= FOLDING_BOUND_PERCENT).all() and acc.seed.eq(1).all()
    speed = pd.read_csv(tiny_run / "tables" / "speed.csv")
    assert (speed.seconds.dropna() > 0).all() and set(speed.threads.dropna()) >= {1}
    assert list(speed.columns[:2]) == ["method", "cpu"] and speed.cpu.dropna().str.contains("bf16 units").all()
    aldk = speed[speed.method == "student_aldk"]  # the tiny config's reference (recommended) student
    assert np.allclose(aldk.time_ratio_to_student, 1.0)
    ants = speed[speed.method == "peer_ants_syn"]
    if len(ants) and ants.seconds.notna().all():  # timed where antspyx is installed
        # a ratio to ANTs' time at the same threads (not asserted faster: a loaded CI machine can
        # slow a tiny forward pass below a tiny SyN run; speed belongs to the benchmarks)
        assert np.allclose(ants.speedup_over_ants_syn, 1.0)
        by_threads = ants.set_index("threads").seconds
        np.testing.assert_allclose(aldk.speedup_over_ants_syn, by_threads[aldk.threads].values / aldk.seconds.values)
    if "note" in acc.columns and isinstance(acc.loc["peer_ants_syn", "note"], str):
        assert "not installed" in acc.loc["peer_ants_syn", "note"]  # skipped, and says so
    else:
        # scored on every test pair; whether ANTs registers is asserted on a known shift in
        # test_peers.py. Its default SyN (pyramid down to 1/8) on these 24-voxel volumes sits below
        # no registration (Dice 0.342 against 0.378 in CI and here, 38 % folding on one pair) and
        # varies from call to call (three calls on one pair: image correlation 0.79 to 0.82)
        ants_pairs = pd.read_csv(tiny_run / "eval" / "peer_ants_syn_pairs.csv")
        assert len(ants_pairs) == len(pd.read_csv(tiny_run / "eval" / "identity_pairs.csv")) == 6
        assert ants_pairs.dice.gt(0).all()  # some overlap kept on every pair
    ablation = pd.read_csv(tiny_run / "tables" / "ablation.csv")
    assert list(ablation.variant) == ["unsupervised", "aldk"]
    assert list(ablation.teacher_targets) == ["none", "refined"]
    # ALDK's similarity at the unsupervised weight (config.yaml's aldk: similarity_weight 1 / gamma)
    assert np.allclose(ablation.similarity_weight, 1.0, atol=1e-4)
    assert (ablation.steps == 120).all()  # the tiny config's student steps, as trained
    # `all`'s one paired test: ALDK against its unsupervised twin on the test pairs (6: p exists)
    paired = ablation.set_index("variant")
    assert pd.isna(paired.loc["unsupervised", "against"]) and paired.loc["aldk", "against"] == "unsupervised"
    assert 0 <= paired.loc["aldk", "wilcoxon_p"] <= 1 and paired.loc["aldk", "pairs"] == 6
    for name in ("teacher", "student_unsupervised", "student_aldk"):
        curve = pd.read_csv(tiny_run / "training" / f"{name}_validation.csv")
        assert curve.step.iloc[0] == 0 and curve.step.is_monotonic_increasing and curve.dice.notna().all()
    assert (tiny_run / "figures" / "learning_curves.png").stat().st_size > 10_000
    losses = pd.read_csv(tiny_run / "training" / "student_aldk_loss.csv")
    assert {"critic", "wasserstein", "adversarial"} <= set(losses.columns)
    assert (tiny_run / "logs" / "train_teacher.log").read_text().count("it/s") > 0
    assert (tiny_run / "benchmarks" / "train_teacher.tsv").exists()
    # said at the start, checked at the end (ldreg.estimate; costs from the reference run)
    estimate = (tiny_run / "logs" / "estimate.log").read_text()
    assert re.search(r"estimated duration: \d+ (min|s) for \d+ job\(s\) on 2 core\(s\)", estimate), estimate
    assert "the run took" in estimate
    durations = pd.read_csv(tiny_run / "logs" / "run_durations.csv")
    assert list(durations.targets) == ["all"] and durations.took_min.iloc[0] > 0, durations


def test_native_resolution_and_real_anatomy_tables_score_every_method(tiny_run):
    """Every method at the scan's own resolution through register's path, on the cohort's test
    pairs and on the real anatomy (Colin27 + AAL, resampled to 4 mm in the tiny config)."""
    # Greedy: the tiny config's fast setting and config.yaml's accurate one (configs merge key by key);
    # config.yaml's settings with levels of their own (register's default, iterations per level,
    # and a 3 mm finest level), named by them, refine the tiny config's model
    expected = {"identity", "affine", "student_aldk", "peer_ants_syn", "peer_greedy_fast", "peer_greedy_accurate",
                "student_aldk+refine5", "student_aldk+refine10x10x2_4-3-2mm", "student_aldk+refine12_4-3mm"}
    for stem in ("accuracy_native", "accuracy_real"):
        table = pd.read_csv(tiny_run / "tables" / f"{stem}.csv").set_index("method")
        assert (tiny_run / "tables" / f"{stem}.md").exists()
        assert set(table.index) == expected, stem
        scored = table.dropna(subset=["dice_mean"])
        assert scored.cpu.str.contains("avx2").all() and scored.seed.eq(1).all()
        # every method but no registration timed end to end on the run's cores
        assert (scored.drop(index="identity").seconds > 0).all() and np.isnan(scored.loc["identity", "seconds"])
        assert scored.loc["identity", "dice_gain"] == 0
        # ANTs on its first pair only (tiny config: ants_pairs 1), its gain against those pairs
        if "peer_ants_syn" in scored.index:
            assert scored.loc["peer_ants_syn", "pairs"] == 1
        # the refinement's stage is timed, and the Greedy peer registers (beats no registration)
        levels = [c for c in scored.columns if c.startswith("refine_")]
        assert levels and (scored.loc["student_aldk+refine5", levels] > 0).all()
        own = scored.loc["student_aldk+refine12_4-3mm"]
        assert own.refine_4mm_s > 0 and own.refine_3mm_s > 0 and np.isnan(own.refine_2mm_s)
        assert (scored.loc["student_aldk+refine10x10x2_4-3-2mm", ["refine_4mm_s", "refine_3mm_s", "refine_2mm_s"]] > 0).all()
        assert scored.loc["peer_greedy_fast", "dice_gain"] > 0.02, stem
    real = pd.read_csv(tiny_run / "tables" / "accuracy_real.csv").set_index("method")
    # Colin27 at 4 mm, cropped to the brain; 2 moved copies; AAL's labels
    assert real.loc["identity", "pairs"] == 2 and real.loc["identity", "spacing_mm"] == 4.0
    per_label = pd.read_csv(tiny_run / "eval_native" / "real" / "identity_labels.csv")
    assert per_label.label.nunique() > 100
    cohort = pd.read_csv(tiny_run / "tables" / "accuracy_native.csv").set_index("method")
    # the synthetic cohort's subjects lie at half the model's spacing (6 mm in the tiny config)
    assert cohort.loc["identity", "spacing_mm"] == 3.0
    assert (tiny_run / "figures" / "accuracy_vs_time_native.png").stat().st_size > 10_000


def test_the_batch_target_registers_the_real_anatomy_pairs_with_pictures(tiny_run):
    summary = pd.read_csv(tiny_run / "batch" / "summary.csv")
    assert list(summary.status) == ["ok", "ok"] and (summary.dice > 0.3).all()
    for pair in summary.pair_id:
        assert (tiny_run / "batch" / pair / "qc.png").stat().st_size > 10_000
        assert (tiny_run / "batch" / pair / "warped.nii.gz").exists()
    assert "qc.png" in (tiny_run / "batch" / "report.md").read_text()


def test_snakemake_report_carries_every_table_and_figure(tiny_run):
    import zipfile

    work = tiny_run.parent
    _run(["--cores", "1", "--configfile", str(TINY), "--config", f"results_dir={work}/results",
          f"resources_dir={work}/resources", "--report", str(work / "report.zip")], cwd=work, timeout=300)
    names = {Path(n).name for n in zipfile.ZipFile(work / "report.zip").namelist()}
    tables = {f"{t}.{ext}" for t in ("accuracy", "ablation", "speed", "speed_profile", "speed_machine",
                                     "accuracy_native", "accuracy_real") for ext in ("csv", "md")}
    figures = {f"{f}.png" for f in ("qualitative", "dice_boxplot", "accuracy_vs_time", "training_curves",
                                    "learning_curves", "accuracy_vs_time_native")}
    assert tables | figures <= names, sorted((tables | figures) - names)


def test_speed_profile_covers_every_native_configuration_and_guards_accuracy(tiny_run):
    from ldreg.engines import native_engines

    table = pd.read_csv(tiny_run / "tables" / "speed_profile.csv")
    assert (tiny_run / "tables" / "speed_profile.md").exists()
    # the CPU and its features stand next to the model
    assert list(table.columns[:3]) == ["model", "cpu", "engine"]
    assert table.cpu.str.contains("avx2").all() and table.cpu.str.contains("bf16 units").all()
    # tiny config: 2 models x engines {float32, bfloat16_cl}, the ones this CPU would emulate only as note rows
    native, skipped = native_engines(["float32", "bfloat16_cl"])
    notes = table[table.total_s.isna()]
    assert sorted(zip(notes.model, notes.engine)) == sorted((m, e) for m in ("teacher", "student_aldk") for e in skipped)
    assert notes.accuracy_note.astype(str).str.contains("emulated").all()
    ants = table[table.model == "peer_ants_syn"]
    greedy = table[table.model == "peer_greedy_fast"]
    profile = table[table.total_s.notna() & ~table.model.str.startswith("peer_")]
    # Greedy end to end on the same inputs and threads (tiny config: greedy_repeats 1)
    assert sorted(zip(greedy.input, greedy.threads)) == sorted(set(zip(profile.input, profile.threads)))
    assert (greedy[["network_s", "warp_s"]] > 0).all().all()
    assert set(profile.model) == {"teacher", "student_aldk"} and set(profile.engine) == set(native)
    # ANTs SyN end to end on every input and thread count (tiny config: ants_repeats 1); each row's
    # speed-up refers to the ANTs row of its own input and threads
    assert sorted(zip(ants.input, ants.threads)) == sorted(set(zip(profile.input, profile.threads)))
    assert (ants[["preprocess_s", "network_s", "warp_s", "write_s"]] > 0).all().all()
    np.testing.assert_allclose(ants.speedup_vs_ants_syn, 1.0)
    for row in profile.itertuples():
        match = ants[(ants.input == row.input) & (ants.threads == row.threads)].total_s.iloc[0]
        assert row.speedup_vs_ants_syn == pytest.approx(match / row.total_s)
    # inputs on the model's grid and one scan at its own resolution (tiny config: 40x48x40 at 1.5 mm)
    assert sorted(profile.input.unique()) == ["40x48x40 at 1.5 mm", "on the model grid"]
    assert len(profile) == 2 * len(native) * profile.threads.nunique() * 2
    stages = profile[["preprocess_s", "network_s", "warp_s", "write_s"]]
    assert (stages > 0).all().all()
    np.testing.assert_allclose(profile.total_s, stages.sum(axis=1), rtol=0.5)  # medians of sums vs sums of medians
    assert (profile.peak_rss_mb > 100).all() and (profile.gflops > 0).all()
    assert profile.dice.between(0, 1).all()
    reference = profile[profile.engine == "float32"]
    assert (reference.dice_change_vs_reference == 0).all()
    teacher = reference[reference.model == "teacher"]
    np.testing.assert_allclose(teacher.speedup_vs_baseline, 1.0)  # each input against its own teacher row
    # the student has fewer FLOPs than the teacher on the same grid
    by_model = profile.groupby("model").gflops.first()
    assert by_model["student_aldk"] < by_model["teacher"]
    machine = pd.read_csv(tiny_run / "tables" / "speed_machine.csv")
    assert machine.cpu.str.contains("bf16 units").all()
    # a register process's fixed cost, every step measured; --help answers without torch (tens of
    # times faster than torch's import: the margin is no timing target, the import is what it shows)
    start_up = machine[machine.op.str.startswith("start-up")].set_index("op").seconds
    assert len(start_up) == 5 and (start_up > 0).all()
    assert start_up["start-up: register --help"] < start_up["start-up: import torch"] / 2
    machine = machine[~machine.op.str.startswith("start-up")]
    measured = machine[machine.gflops_per_s.notna()]
    assert (measured.gflops_per_s > 0).all() and "float32" in set(measured.dtype)
    assert (machine.dtype == "bfloat16").any()  # measured, or a row saying why not
    skipped_ops = machine[machine.gflops_per_s.isna()]  # none on a CPU with bf16 units: no note to read
    assert skipped_ops.note.astype(str).str.contains("emulated").all()


def test_forcing_one_variant_reruns_only_it_and_its_dependents(tiny_run):
    work = tiny_run.parent
    proc = _run(["all", "-n", "--cores", "2", "--forcerun", str(tiny_run / "models" / "student_unsupervised.pt"),
                 "--configfile", str(TINY), "--config", f"results_dir={work}/results", f"resources_dir={work}/resources"],
                cwd=work)
    out = proc.stdout + proc.stderr
    assert "variant=unsupervised" in out
    assert "variant=aldk" not in out and "variant=distill" not in out
    assert "rule train_teacher" not in out and "rule preprocess" not in out
    assert "method=student_unsupervised" in out and "method=teacher" not in out


def test_a_raw_target_variant_adds_only_its_cache_and_student(tiny_run, tmp_path):
    work = tiny_run.parent
    extra = tmp_path / "raw.yaml"
    extra.write_text("students: {headline: [unsupervised, aldk, distill_raw],\n"
                     "           variants: {distill_raw: {targets: raw, train: {distillation: l2}}}}\n")
    proc = _run(["all", "-n", "--cores", "2", "--configfile", str(TINY), str(extra), "--config",
                 f"results_dir={work}/results", f"resources_dir={work}/resources"], cwd=work)
    out = proc.stdout + proc.stderr
    assert "rule cache_teacher_flows:" in out and "variant=distill_raw" in out
    # the refined targets, the teacher and the other students are untouched
    assert "rule cache_refined_teacher_flows" not in out and "rule train_teacher" not in out
    assert "variant=distill\n" not in out and "variant=aldk" not in out


def test_a_changed_cohort_setting_makes_the_cohort_again(tiny_run, tmp_path):
    """The synthetic cohort lies in resources/, outside the results: a changed data.synthetic key
    (here the label appearance) must make it again and everything trained on it, not reuse it."""
    work = tiny_run.parent
    extra = tmp_path / "painted.yaml"
    extra.write_text("data: {synthetic: {appearance: labels}}\n")
    proc = _run(["all", "-n", "--cores", "2", "--configfile", str(TINY), str(extra), "--config",
                 f"results_dir={work}/results", f"resources_dir={work}/resources"], cwd=work)
    out = proc.stdout + proc.stderr
    assert "rule make_synthetic_cohort:" in out and "rule train_teacher:" in out


def test_the_ablation_target_adds_the_other_variants_and_tests_each_against_its_twin(tiny_run):
    work = tiny_run.parent
    args = ["ablation", "--cores", "2", "--configfile", str(TINY), "--config", f"results_dir={work}/results",
            f"resources_dir={work}/resources"]
    dry = _run([*args[:1], "-n", *args[1:]], cwd=work)
    out = dry.stdout + dry.stderr
    # on top of `all`: the one other variant, its scores and the ablation's own tables
    assert "variant=distill" in out and "variant=aldk" not in out and "variant=unsupervised" not in out
    assert "rule train_teacher" not in out and "method=teacher" not in out
    _run(args, cwd=work, timeout=900)
    tables = tiny_run / "ablation" / "tables"
    ablation = pd.read_csv(tables / "ablation.csv").set_index("variant")
    assert list(ablation.index) == ["unsupervised", "distill", "aldk"]
    assert list(ablation.against.fillna("")) == ["", "unsupervised", "unsupervised"]
    assert ablation.loc[["distill", "aldk"], "wilcoxon_p"].between(0, 1).all()
    assert ablation.loc[["distill", "aldk"], "pairs"].eq(6).all()
    assert "student_distill" in set(pd.read_csv(tables / "accuracy.csv").method)
    # at the scan's resolution: the models native_evaluation.models names (the tiny config: aldk)
    for stem in ("accuracy_native", "accuracy_real"):
        assert "student_aldk" in set(pd.read_csv(tables / f"{stem}.csv").method), stem
    assert (tiny_run / "ablation" / "figures" / "learning_curves.png").stat().st_size > 10_000
    # `all`'s own tables are left as they were: the headline students only
    assert "student_distill" not in set(pd.read_csv(tiny_run / "tables" / "accuracy.csv").method)


def test_a_timed_out_workflow_leaves_no_process_and_names_the_running_rule(tmp_path):
    with pytest.raises(WorkflowTimeout) as err:
        _run(["all", "--cores", "1", "--configfile", str(TINY), "--config", f"results_dir={tmp_path}/results",
              f"resources_dir={tmp_path}/resources"], cwd=tmp_path, timeout=25)
    assert re.search(r"while running rule\(s\) \w+", str(err.value)), str(err.value)
    assert "(none started)" not in str(err.value)
    # nothing of the group is left (orphans are reaped by init within moments)
    for _ in range(50):
        if not _group_alive(err.value.process_group):
            break
        time.sleep(0.1)
    assert not _group_alive(err.value.process_group)


@pytest.mark.parametrize("text, message", [
    ("teacher: {cascades: 0}\n", "0 is less than the minimum of 1"),
    ("unknown_key: 1\n", "'unknown_key' was unexpected"),
    ("pairs: {train: many}\n", "'many' is not of type 'integer'"),
    ("speed_profile: {models: [teacher], reference_model: student_unsupervised}\n",
     "speed_profile.reference_model 'student_unsupervised' must be one of"),
    ("evaluation: {refine: {models: [student_nonexistent]}}\n", "does not train"),
    # config.yaml's teacher-taught students learn from refined fields
    ("teacher_cache: {refine: {steps: 0}}\n", "needs teacher_cache.refine.steps >= 1"),
    ("teacher_cache: {refine: {steps: 2}}\nstudents: {variants: {unsupervised: {targets: refined}}}\n",
     "uses no teacher field"),
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


SLURM_PLUGIN = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None
# CI installs SLURM and the plugin and sets this: there the real run must not be skipped
SLURM_REQUIRED = os.environ.get("LDREG_REQUIRE_SLURM") == "1"


@pytest.mark.skipif(not SLURM_PLUGIN, reason="snakemake-executor-plugin-slurm not installed ([slurm] extra)")
def test_slurm_profile_dry_run(tmp_path):
    _run(["all", "-n", "--workflow-profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--configfile", str(TINY),
          "--config", f"results_dir={tmp_path}/results", f"resources_dir={tmp_path}/resources"], cwd=tmp_path)


# The shipped profile, with what a one-node, 2-CPU, GPU-less test cluster cannot give overridden
SLURM_TEST_OVERRIDES = [
    "--cores", "2", "--jobs", "2", "--latency-wait", "5",
    # a one-node test cluster answers at once: the first status check after 1 s, not 40
    "--slurm-init-seconds-before-status-checks", "1",
    "--set-resources", *[f"{rule}:{k}={v}" for rule in ("train_teacher", "cache_teacher_flows", "train_student")
                         for k, v in (("slurm_partition", "cpu"), ("gpu", 0), ("mem_mb", 4000))],
    "time_cpu:mem_mb=4000",
    "--set-threads", "train_teacher=2", "train_student=2", "evaluate=1", "time_cpu=2",
]


def _slurm_cluster() -> str | None:
    """Start the one-node cluster (tests/slurm/start_cluster.sh); the reason if it cannot be had."""
    import shutil

    if not SLURM_PLUGIN:
        return "snakemake-executor-plugin-slurm not installed ([slurm] extra)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # the daemons live in sbin
    if not all(shutil.which(t, path=path) for t in ("slurmctld", "slurmd", "munged", "sbatch", "squeue")):
        return "SLURM not installed (Debian: slurmctld slurmd slurm-client munge; .ci/run installs them)"
    if os.geteuid() != 0:
        return "starting a SLURM cluster needs root"
    proc = subprocess.run(["bash", str(ROOT / "tests" / "slurm" / "start_cluster.sh")], capture_output=True, text=True,
                          timeout=120)
    return None if proc.returncode == 0 else f"the test cluster did not start: {proc.stderr[-2000:]}"


@pytest.mark.slurm_cluster
def test_slurm_profile_runs_the_tiny_config_for_real(tmp_path):
    """Every job of the tiny DAG submitted with sbatch, run on the node and its outputs handed
    back (training cut to a few steps: what the models learn is the local tiny run's business)."""
    reason = _slurm_cluster()
    if reason:
        if SLURM_REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    result = _run(["all", "--workflow-profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--configfile",
                   str(TINY), str(ROOT / "tests" / "slurm" / "few_steps.yaml"), "--config",
                   f"results_dir={tmp_path}/results", f"resources_dir={tmp_path}/resources", *SLURM_TEST_OVERRIDES],
                  cwd=tmp_path, timeout=900)
    log = result.stdout + result.stderr
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", log)
    rules = set(re.findall(r"slurm_logs/rule_(\w+)/", log))
    # the tiny config's students learn from refined fields (config.yaml's targets)
    assert {"train_teacher", "cache_refined_teacher_flows", "train_student", "evaluate", "tables", "make_real_anatomy",
            "evaluate_native", "native_tables", "register_batch"} <= rules, rules
    assert len(submitted) >= 15
    for table in ("accuracy", "ablation", "speed", "accuracy_native", "accuracy_real"):
        assert (tmp_path / "results" / "tables" / f"{table}.csv").stat().st_size > 0
    assert set(pd.read_csv(tmp_path / "results" / "batch" / "summary.csv").status) == {"ok"}
    accuracy = pd.read_csv(tmp_path / "results" / "tables" / "accuracy.csv")
    assert {"teacher", "student_aldk", "identity"} <= set(accuracy.method)


def test_more_cores_than_the_machine_has_cannot_oversubscribe_it(tmp_path):
    """`--cores` four times the machine's cores: every job takes at least four scheduler slots a
    thread, so the jobs Snakemake starts side by side run at most the machine's cores in threads."""
    machine = len(os.sched_getaffinity(0))
    cores = 4 * machine
    proc = _run(["all", "-n", "--cores", str(cores), "--configfile", str(TINY), "--config",
                 f"results_dir={tmp_path}/results", f"resources_dir={tmp_path}/resources"], cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    jobs = re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", out, flags=re.M)
    assert len(jobs) > 30
    for rule, body in jobs:
        threads = int(re.search(r"threads: (\d+)", body).group(1)) if "threads:" in body else 1
        assert rule == "all" or threads >= 4, (rule, threads)
    from ldreg.pipeline import usable_threads

    previous = os.environ.get("LDREG_SLOTS_PER_THREAD")
    os.environ["LDREG_SLOTS_PER_THREAD"] = "4.0"
    try:  # what the jobs run: their slots over four, at most the machine's cores
        assert usable_threads(4) == 1 and usable_threads(cores) == machine
    finally:
        os.environ.pop("LDREG_SLOTS_PER_THREAD") if previous is None else os.environ.update(LDREG_SLOTS_PER_THREAD=previous)
