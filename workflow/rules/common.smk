import math
import os
import re
import time
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from ldreg.config_checks import config_problems, headline_variants, student_targets, switched_on_variants
from ldreg.methods import ANTS, greedy_method, parse_method, refined_method

# Names shared by every rule: the models, the evaluated methods and where their files lie.
RESULTS = config["results_dir"]
RESOURCES = config["resources_dir"]
# a variant set to null in a later --configfile is switched off. `all` trains the headline
# variants (students.headline); the `ablation` target every switched-on one
ABLATION_VARIANTS = switched_on_variants(config)
VARIANTS = headline_variants(config)
PEERS = config["peers"]
# --cores above the machine's cores (`--cores 8` typed on 2 cores) would let Snakemake start jobs
# side by side whose threads together oversubscribe the CPU. Locally, each thread of a job then
# takes cores / machine scheduler slots (a 1-thread job: slots(1)); ldreg.pipeline.usable_threads
# divides a job's slots back into threads (LDREG_SLOTS_PER_THREAD, set below). On a cluster
# a job's threads are its own CPUs: one slot a thread.
USABLE_CORES = len(os.sched_getaffinity(0))


def requested_cores():
    """--cores of this run; None where none is known (older Snakemake leaves a dry run's unset)."""
    try:
        return workflow.cores
    except WorkflowError:
        return None


def all_cores(wildcards=None):
    """Threads of a job that uses the whole run (a dry run without --cores: 1)."""
    return requested_cores() or 1


def slots_per_thread():
    cores = requested_cores()
    if not workflow.local_exec or not isinstance(cores, int) or cores <= USABLE_CORES:
        return 1.0
    return cores / USABLE_CORES


# the jobs read how many scheduler slots make one of their threads
os.environ["LDREG_SLOTS_PER_THREAD"] = repr(slots_per_thread())


def slots(threads):
    """Scheduler slots of a job that runs ``threads`` threads."""
    slots_wanted = math.ceil(threads * slots_per_thread())
    cores = requested_cores()
    return max(1, slots_wanted if cores is None else min(cores, slots_wanted))


# training jobs take half the cores, so that two run side by side (the teacher beside the students
# and peers that do not wait for it): on 2 cores two 1-thread jobs made 3.2 teacher steps a second
# together against 2.2 for one 2-thread job (docs/performance.md)
# (a function: workflow.cores is only known once a run asks for cores, not for --unlock or --lint)
def train_threads(wildcards):
    return max(1, (requested_cores() or 1) // 2)
PEER_MODELS = ["peer_voxelmorph"] if PEERS["voxelmorph"]["enabled"] else []
# ANTs has no model file: evaluated and timed by rules of its own kind
ANTS_METHODS = [ANTS] if PEERS["ants_syn"]["enabled"] else []
# Greedy: evaluated (its 1-thread evaluation time is its time), one method per setting
GREEDY = [greedy_method(s) for s in PEERS["greedy"]["settings"]] if PEERS["greedy"]["enabled"] else []
# per-pair optimisation (ldreg.optimise) alone, and started from a model's field
REFINE = config["evaluation"]["refine"]
REFINED_FROM_MODELS = [refined_method(m, k) for m in REFINE["models"] for k in REFINE["steps"]]
# settings with their own levels: at the scan's own resolution only (the model's grid has one spacing)
REFINED_WITH_SPACINGS = [refined_method(m, s["steps"], s["spacings"]) for m in REFINE["models"]
                         for s in REFINE.get("with_spacings") or []]
REFINED = [f"optimise{k}" for k in REFINE["optimise_steps"]] + REFINED_FROM_MODELS
NATIVE = config["native_evaluation"]


def method_sets(variants):
    """What a target trains and scores, given its student variants: models (each a model file),
    timed (CPU-timed), methods (scored on the model grid), native_models and native_methods
    (scored at the scan's own resolution through register's path)."""
    models = ["teacher"] + [f"student_{v}" for v in variants] + PEER_MODELS
    native_models = models if NATIVE["models"] is None else NATIVE["models"]
    return {
        "models": models,
        "timed": models + ANTS_METHODS,
        "methods": ["identity", "affine", *models, *ANTS_METHODS, *GREEDY, *REFINED],
        "native_models": native_models,
        "native_methods": ["identity", "affine", *native_models, *ANTS_METHODS, *GREEDY, *REFINED_FROM_MODELS,
                           *REFINED_WITH_SPACINGS],
    }


HEADLINE = method_sets(VARIANTS)
ABLATION = method_sets(ABLATION_VARIANTS)
MODELS, TIMED, METHODS = HEADLINE["models"], HEADLINE["timed"], HEADLINE["methods"]
NATIVE_MODELS, NATIVE_METHODS = HEADLINE["native_models"], HEADLINE["native_methods"]
NATIVE_COHORTS = (["cohort"] if NATIVE["enabled"] else []) + (["real"] if NATIVE["enabled"] and config["real_anatomy"]["enabled"] else [])


wildcard_constraints:
    variant="|".join(ABLATION_VARIANTS) or "none",
    model="|".join(ABLATION["models"]),
    method="|".join(re.escape(m) for m in dict.fromkeys(ABLATION["methods"] + ABLATION["native_methods"])),
    cohort="cohort|real",


def model_file(name):
    return f"{RESULTS}/models/{name}.pt"


def source_root():
    source = config["data"]["source"]
    return f"{RESOURCES}/synthetic" if source == "synthetic" else f"{RESOURCES}/{source}"


def source_input(wildcards):
    source = config["data"]["source"]
    if source == "synthetic":
        return f"{RESOURCES}/synthetic/subjects.csv"
    if source == "folder":
        return []
    return f"{RESOURCES}/{source}/.done"


def teacher_cache_for(wildcards):
    """The cached teacher fields a student variant learns from (none: it does not wait for the teacher)."""
    targets = student_targets(config, wildcards.variant)
    if targets is None:
        return []
    return rules.cache_teacher_flows.output.flows if targets == "raw" else rules.cache_refined_teacher_flows.output.flows


def method_model(wildcards):
    model = parse_method(wildcards.method).model
    return [] if model is None else model_file(model)


def batch_model_name():
    """The batch's model: a model file, a model this run trains, or (null) the speed profile's
    reference model, the recommended one (else the last model it profiles)."""
    profile = config["speed_profile"]
    return config["batch"]["model"] or profile.get("reference_model") or (profile.get("models") or [""])[-1]


def batch_model(wildcards):
    model = batch_model_name()
    return model if model.endswith(".pt") else model_file(model)


def batch_pairs(wildcards):
    if config["batch"].get("moving_dir"):
        return []
    return config["batch"]["pairs"] or f"{RESOURCES}/real_anatomy/pairs.csv"


# cross-key checks the schema cannot express (ldreg.config_checks, the same ones the jobs run),
# so that a bad combination stops before any job runs
_problems = config_problems(config, MODELS)
_problems += [f"native_evaluation.models names {m!r}, which this configuration does not train" for m in NATIVE_MODELS
              if m not in MODELS]
_batch_model = batch_model_name()
if config["batch"]["enabled"] and not _batch_model.endswith(".pt") and _batch_model not in MODELS:
    _problems.append(f"batch.model names {_batch_model!r}, which this configuration does not train "
                     "(name a trained model or a .pt file)")
if _problems:
    raise ValueError("config: " + "; ".join(_problems))


# ------------------------------------------------------------------ the run's duration, said at start
RUN_STARTED = {}


def run_targets():
    """The rules this run was asked for (`all`, `ablation`, ...)."""
    try:
        return sorted({job.rule.name for job in workflow.dag.targetjobs})
    except AttributeError:  # a Snakemake without the attribute: the history says so
        return ["(unknown)"]


def planned_jobs():
    """The jobs this run still has to do, as ldreg.estimate prices them (Snakemake's DAG)."""
    from ldreg.estimate import TRAINING_RULES, PlannedJob
    from ldreg.pipeline import training_steps

    dag = workflow.dag
    needed = list(dag.needrun_jobs())
    names = {job: Path(str(job.benchmark)).stem if job.benchmark else f"{job.rule.name}_{job.jobid}" for job in needed}
    planned = []
    for job in needed:
        rule_name = job.rule.name
        steps = (training_steps(config, rule_name, getattr(job.wildcards, "variant", None))
                 if rule_name in TRAINING_RULES else None)
        planned.append(PlannedJob(name=names[job], rule=rule_name, threads=job.threads, steps=steps,
                                  after=tuple(names[d] for d in dag.dependencies[job] if d in names),
                                  benchmarked=bool(job.benchmark)))
    return planned

