"""The run's duration estimate (ldreg.estimate): costs scaled by steps, grid and CPU speed, and the
duration bounded by the CPU work over the cores and by the longest chain of jobs."""
import json

import pytest

from ldreg import estimate
from ldreg.estimate import PlannedJob

REFERENCE = {"cpu": "reference CPU", "grid": [48, 64, 48], "calibration_s_per_step": 0.3, "jobs": {
    "train_teacher": {"rule": "train_teacher", "cpu_s": 400.0, "cpu_s_per_step": 0.4, "threads": 1},
    "train_student_a": {"rule": "train_student", "cpu_s": 300.0, "cpu_s_per_step": 0.5, "threads": 1},
    "train_student_b": {"rule": "train_student", "cpu_s": 100.0, "cpu_s_per_step": 0.1, "threads": 1},
    "evaluate_native_real_x": {"rule": "evaluate_native", "cpu_s": 40.0, "threads": 2},
}}


def test_the_longest_chain_bounds_a_run_whose_work_fits_the_cores():
    jobs = [PlannedJob("train_teacher", "train_teacher", steps=1000),
            PlannedJob("train_student_a", "train_student", steps=600, after=("train_teacher",)),
            PlannedJob("train_student_b", "train_student", steps=1000)]
    result = estimate.estimate(jobs, REFERENCE, cores=2, speed_ratio=1.0, grid=[48, 64, 48])
    # costs per step times this run's steps: 400 + 300 + 100
    assert result.cpu_work_s == pytest.approx(800)
    assert result.longest_chain_s == pytest.approx(700) and result.seconds == pytest.approx(700)
    # twice as slow a CPU, twice the time; one core: the work itself
    assert estimate.estimate(jobs, REFERENCE, 2, 2.0, [48, 64, 48]).seconds == pytest.approx(1400)
    assert estimate.estimate(jobs, REFERENCE, 1, 1.0, [48, 64, 48]).seconds == pytest.approx(800)


def test_grid_scales_training_an_unknown_variant_costs_as_its_rule_and_threads_share_the_cost():
    jobs = [PlannedJob("train_student_new", "train_student", steps=100),
            PlannedJob("evaluate_native_real_x", "evaluate_native", threads=2),
            PlannedJob("tables", "tables", benchmarked=False)]
    result = estimate.estimate(jobs, REFERENCE, cores=2, speed_ratio=1.0, grid=[24, 32, 24])
    # median of the reference students' 0.5 and 0.1 s a step, 100 steps, an eighth of the voxels
    # beyond the process's start
    assert result.cpu_work_s == pytest.approx(3 + (0.3 * 100 - 3) / 8 + 40)
    assert result.costed_by_rule == ["train_student_new"]
    assert result.longest_chain_s == pytest.approx(20)  # 40 core-seconds on 2 threads: the longest job
    assert "train_student_new" in result.message("this CPU") and "this CPU" in result.message("this CPU")


def test_a_reference_is_recorded_from_benchmark_files(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    header = "s\th:m:s\tmax_rss\tcpu_time\n"
    (bench / "train_student_a.tsv").write_text(header + "300\t0:05:00\t800\t240\n")
    (bench / "evaluate_native_real_x.tsv").write_text(header + "30\t0:00:30\t800\t45\n")
    config = {"seed": 0, "teacher": {}, "peers": {"voxelmorph": {}},
              "students": {"defaults": {"train": {"steps": 600}}, "variants": {"a": {"train": {"steps": 1200}}}}}
    planned = estimate.planned_from_benchmarks(bench, config, cores=2)
    assert [(j.name, j.rule, j.threads, j.steps) for j in planned] == [
        ("evaluate_native_real_x", "evaluate_native", 2, None), ("train_student_a", "train_student", 1, 1200)]
    ref = estimate.reference_from_benchmarks(bench, planned, [48, 64, 48], 0.25, "cpu")
    json.dumps(ref)
    assert ref["jobs"]["train_student_a"] == {"rule": "train_student", "cpu_s": 240.0, "threads": 1, "cpu_s_per_step": 0.2}
    assert ref["jobs"]["evaluate_native_real_x"]["cpu_s"] == 60.0  # both cores held 30 s


def test_calibration_times_a_real_training_step():
    seconds = estimate.calibrate([16, 16, 16], steps=2)
    assert 0 < seconds < 10


def test_the_shipped_reference_names_its_cpu_and_prices_the_default_run():
    ref = estimate.load_reference()
    assert ref["cpu"] and ref["calibration_s_per_step"] > 0
    assert {"train_teacher", "train_student_aldk_long", "train_voxelmorph"} <= set(ref["jobs"])


def test_finished_runs_are_recorded_and_rendered_for_the_docs(tmp_path):
    from ldreg.docs import render_blocks

    runs = tmp_path / "logs" / "run_durations.csv"
    runs.parent.mkdir()
    said = estimate.Estimate(seconds=1800, cpu_work_s=3000, longest_chain_s=1500, cores=2, speed_ratio=1.0, jobs=57)
    estimate.record_run(runs, 0.0, 1500, said, ["all"], "CPU A")
    estimate.record_run(runs, 60.0, 1700, said, ["all"], "CPU A")
    estimate.record_run(runs, 90.0, 600, said, ["ablation"], "CPU A")
    block = render_blocks(tmp_path)["durations"]
    # the latest run of each target: `all` took 28.3 min against 30 estimated
    assert "| `all` | 57 | 2, CPU A | 30 min | 28.3 min |" in block and "25.0 min" not in block
    assert "| `ablation` |" in block
    # a rerun of a few jobs of `all` (--forcerun) is recorded but does not stand for `all`
    rerun = estimate.Estimate(seconds=60, cpu_work_s=100, longest_chain_s=60, cores=2, speed_ratio=1.0, jobs=5)
    estimate.record_run(runs, 120.0, 50, rerun, ["all"], "CPU A")
    estimate.record_run(runs, 150.0, 50, rerun, ["all", "time_cpu"], "CPU A")  # --forcerun time_cpu
    assert len(open(runs).read().splitlines()) == 6
    block = render_blocks(tmp_path)["durations"]
    assert "| `all` | 57 | 2, CPU A | 30 min | 28.3 min |" in block and "time_cpu" not in block
