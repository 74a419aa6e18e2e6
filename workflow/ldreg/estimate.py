"""How long a run will take on this CPU, said when it starts (the Snakefile's ``onstart``).

The cost of each job the run still has to do comes from a reference run (``reference_run.json``:
each job's CPU-seconds from Snakemake's benchmark files of the default run on a named CPU, the
training jobs per step), scaled by how fast this CPU trains compared with the reference one: a
calibration of a few seconds that times the default student's training step on the reference
grid, on one thread. Training and target-cache jobs also scale with this run's steps and grid.

The run's duration is then bounded below by its CPU work spread over the cores and by its
longest chain of dependent jobs: the estimate is the larger of the two. Known limits: one
calibration stands for every kind of network (VoxelMorph's ratio between CPU classes differs,
docs/experiments.md), and a job absent from the reference (a new variant or peer) is costed as
the reference jobs of its rule.
"""
from __future__ import annotations

import json
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .methods import ANTS

REFERENCE_FILE = Path(__file__).with_name("reference_run.json")
# jobs whose cost follows the number of training steps (and the grid's voxels)
TRAINING_RULES = ("train_teacher", "train_student", "train_voxelmorph")
GRID_RULES = TRAINING_RULES + ("cache_teacher_flows", "cache_refined_teacher_flows", "evaluate")
# a job's fixed CPU cost: Python, torch's and the package's imports (speed_machine's start-up rows:
# ~3 s on the reference CPU)
JOB_START_S = 3.0


@dataclass(frozen=True)
class PlannedJob:
    """One job of the run: its benchmark name (``train_student_aldk_long``; the rule's name where
    it has none), its rule, the threads it holds and the names of the jobs it waits for."""
    name: str
    rule: str
    threads: int = 1
    after: tuple[str, ...] = ()
    steps: int | None = None  # training jobs: this run's steps
    benchmarked: bool = True  # rules without a benchmark file (tables, figures) cost seconds: 0


@dataclass
class Estimate:
    seconds: float
    cpu_work_s: float
    longest_chain_s: float
    cores: int
    speed_ratio: float  # this CPU's time for the calibration step / the reference CPU's
    jobs: int
    costed_by_rule: list[str] = field(default_factory=list)

    def message(self, cpu: str) -> str:
        note = (f"; {len(self.costed_by_rule)} job(s) not in the reference run, costed as their rule's "
                f"({', '.join(self.costed_by_rule[:4])}{', ...' if len(self.costed_by_rule) > 4 else ''})"
                if self.costed_by_rule else "")
        return (f"estimated duration: {_minutes(self.seconds)} for {self.jobs} job(s) on {self.cores} core(s) of "
                f"{cpu} (this CPU trains {self.speed_ratio:.2f}x the reference run's time a step; CPU work "
                f"{_minutes(self.cpu_work_s)}, longest chain of jobs {_minutes(self.longest_chain_s)}){note}")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def load_reference(path=REFERENCE_FILE) -> dict:
    return json.loads(Path(path).read_text())


def calibrate(grid, steps: int = 3, seed: int = 0) -> float:
    """Seconds of one training step (forward, local NCC + smoothness, backward, Adam) of the
    default two-cascade student on ``grid``, on one thread: the median of ``steps`` after a
    warm-up step."""
    import torch

    from .allocator import keep_freed_memory
    from .losses import similarity_loss, smoothness_loss
    from .networks import CascadeSpec, build_network

    keep_freed_memory()  # as the training jobs run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(seed)
        model = build_network(CascadeSpec(kind="student", cascades=2, width=16, depth=4, affine=True,
                                          affine_width=16, flow_level=2), seed=seed)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
        moving, fixed = (torch.rand((1, 1, *grid), generator=generator) for _ in range(2))
        times = []
        with warnings.catch_warnings():  # MONAI's spatial gradient indexes with a list (torch 2.x warns)
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(steps + 1):
                start = time.perf_counter()
                out = model(moving, fixed)
                loss = similarity_loss("local_ncc", out["warped"], fixed) + sum(smoothness_loss(f) for f in out["fields"][1:])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                times.append(time.perf_counter() - start)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)


def job_cost(job: PlannedJob, reference: dict, voxel_ratio: float) -> tuple[float, bool]:
    """The job's CPU-seconds on the reference CPU, and whether it was costed by its rule (absent
    from the reference run)."""
    jobs = reference["jobs"]
    known = jobs.get(job.name)
    by_rule = known is None
    if by_rule:  # the median of the reference's jobs of the same rule (per step for training)
        same = [j for j in jobs.values() if j["rule"] == job.rule]
        if not same:
            return 0.0, True
        known = {"cpu_s": statistics.median(j["cpu_s"] for j in same),
                 "cpu_s_per_step": statistics.median(j.get("cpu_s_per_step") or 0.0 for j in same)}
    if job.rule in TRAINING_RULES and job.steps and known.get("cpu_s_per_step"):
        cost = known["cpu_s_per_step"] * job.steps
    else:
        cost = known["cpu_s"]
    if job.rule in GRID_RULES:  # a process's start does not shrink with the grid
        start = min(cost, JOB_START_S)
        cost = start + (cost - start) * voxel_ratio
    return cost, by_rule


def estimate(jobs: list[PlannedJob], reference: dict, cores: int, speed_ratio: float, grid) -> Estimate:
    """The run's duration: max(CPU work / cores, longest chain), each job's cost scaled by
    ``speed_ratio``; a job of several threads holds that many cores for cost / threads."""
    ref_grid = reference["grid"]
    voxel_ratio = (grid[0] * grid[1] * grid[2]) / (ref_grid[0] * ref_grid[1] * ref_grid[2])
    cost, by_rule = {}, []
    for job in jobs:
        if not job.benchmarked:
            cost[job.name], guessed = 0.0, False
        else:
            cost[job.name], guessed = job_cost(job, reference, voxel_ratio)
        cost[job.name] *= speed_ratio
        if guessed:
            by_rule.append(job.name)
    threads = {j.name: max(1, min(j.threads, cores)) for j in jobs}
    # a multi-threaded job's cpu_s was measured on its threads: it takes cpu_s / threads of wall time
    wall = {name: cost[name] / threads[name] for name in cost}
    finish: dict[str, float] = {}

    def chain(job: PlannedJob) -> float:
        if job.name not in finish:
            finish[job.name] = wall[job.name] + max((chain(by_name[a]) for a in job.after if a in by_name), default=0.0)
        return finish[job.name]

    by_name = {j.name: j for j in jobs}
    longest = max((chain(j) for j in jobs), default=0.0)
    work = sum(cost.values())
    return Estimate(seconds=max(work / cores, longest), cpu_work_s=work, longest_chain_s=longest, cores=cores,
                    speed_ratio=speed_ratio, jobs=len(jobs), costed_by_rule=by_rule)


def reference_from_benchmarks(bench_dir, planned: list[PlannedJob], grid, calibration_s: float, cpu: str) -> dict:
    """A reference run from a finished run's Snakemake benchmark files (``<name>.tsv``) and the
    planned jobs (rules, threads, steps). A 1-thread job's cost is its CPU time (what it needs
    whatever ran beside it); a multi-threaded job's the cores it held: wall seconds x threads."""
    import pandas as pd

    jobs = {}
    for job in planned:
        path = Path(bench_dir) / f"{job.name}.tsv"
        if not path.exists():
            continue
        bench = pd.read_csv(path, sep="\t").iloc[-1]
        cpu_s = float(bench["cpu_time"]) if job.threads <= 1 else float(bench["s"]) * job.threads
        entry = {"rule": job.rule, "cpu_s": round(cpu_s, 1), "threads": job.threads}
        if job.rule in TRAINING_RULES and job.steps:
            entry["cpu_s_per_step"] = round(cpu_s / job.steps, 4)
        jobs[job.name] = entry
    return {"cpu": cpu, "grid": list(grid), "calibration_s_per_step": round(calibration_s, 4), "jobs": jobs}


def announce(planned: list[PlannedJob], cores: int, grid, log_path, reference_path=REFERENCE_FILE) -> Estimate:
    """Calibrate, estimate the run of ``planned`` jobs on ``grid`` and write what it says to
    ``log_path`` (and return it)."""
    from .engines import cpu_summary

    reference = load_reference(reference_path)
    calibration = calibrate(reference["grid"])
    result = estimate(planned, reference, cores, calibration / reference["calibration_s_per_step"], grid)
    text = (f"{result.message(cpu_summary())}\n"
            f"reference run: {reference['cpu']}, calibration {reference['calibration_s_per_step']:.3f} s a step; "
            f"here {calibration:.3f} s\n")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    Path(log_path).write_text(text)
    return result


# the rules whose jobs hold all the run's cores (their `threads: all_cores` in workflow/rules);
# the rest hold one (training: half the cores, one on 2)
ALL_CORE_RULES = ("evaluate_native", "register_batch", "make_synthetic_cohort", "preprocess", "speed_profile",
                  "time_cpu", "time_ants")
# benchmark names start with their rule's name (longest first: evaluate_native before evaluate)
BENCHMARKED_RULES = sorted(ALL_CORE_RULES + TRAINING_RULES + ("evaluate", "cache_teacher_flows",
                                                              "cache_refined_teacher_flows", "make_real_anatomy"),
                           key=len, reverse=True)


def planned_from_benchmarks(bench_dir, config: dict, cores: int) -> list[PlannedJob]:
    """The jobs of a finished run as its benchmark files name them (for :func:`reference_from_benchmarks`)."""
    from .pipeline import training_steps

    jobs = []
    for path in sorted(Path(bench_dir).glob("*.tsv")):
        name = path.stem
        rule = next((r for r in BENCHMARKED_RULES if name == r or name.startswith(r + "_")), None)
        if rule is None:
            continue
        threads = cores if rule in ALL_CORE_RULES or name == f"evaluate_{ANTS}" else max(1, cores // 2)
        steps = None
        if rule in TRAINING_RULES:
            steps = training_steps(config, rule, name.removeprefix("train_student_") if rule == "train_student" else None)
        jobs.append(PlannedJob(name=name, rule=rule, threads=threads, steps=steps))
    return jobs


RUN_COLUMNS = ["started", "targets", "jobs", "cores", "cpu", "estimate_min", "took_min", "speed_ratio"]


def record_run(path, started: float, took_s: float, result: Estimate, targets: list[str], cpu: str) -> None:
    """Append a finished run (its targets, the estimate said at its start, how long it took) to
    the run history ``path`` (CSV, one row a run; the README's run times are generated from it)."""
    import pandas as pd

    row = {"started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)), "targets": " ".join(targets),
           "jobs": result.jobs, "cores": result.cores, "cpu": cpu, "estimate_min": round(result.seconds / 60, 1),
           "took_min": round(took_s / 60, 1), "speed_ratio": round(result.speed_ratio, 3)}
    path = Path(path)
    new = pd.DataFrame([row], columns=RUN_COLUMNS)
    (pd.concat([pd.read_csv(path), new], ignore_index=True) if path.exists() else new).to_csv(path, index=False)
