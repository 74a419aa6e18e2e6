import re

from ldreg.config_checks import config_problems, student_targets

# Names shared by every rule: the models, the evaluated methods and where their files lie.
RESULTS = config["results_dir"]
RESOURCES = config["resources_dir"]
# a variant set to null in a later --configfile is switched off
VARIANTS = [v for v, s in config["students"]["variants"].items() if s is not None]
PEERS = config["peers"]
# training jobs take half the cores, so that two run side by side (the teacher beside the students
# and peers that do not wait for it): on 2 cores two 1-thread jobs made 3.2 teacher steps a second
# together against 2.2 for one 2-thread job (docs/performance.md)
# (a function: workflow.cores is only known once a run asks for cores, not for --unlock or --lint)
def train_threads(wildcards):
    return max(1, workflow.cores // 2)
MODELS = (
    ["teacher"]
    + [f"student_{v}" for v in VARIANTS]
    + (["peer_voxelmorph"] if PEERS["voxelmorph"]["enabled"] else [])
)
# ANTs has no model file: evaluated and timed by rules of its own kind
TIMED = MODELS + (["peer_ants_syn"] if PEERS["ants_syn"]["enabled"] else [])
# per-pair optimisation (ldreg.optimise) alone, and started from a model's field
REFINE = config["evaluation"]["refine"]
REFINED = [f"optimise{k}" for k in REFINE["optimise_steps"]]
REFINED.extend(f"{m}+refine{k}" for m in REFINE["models"] for k in REFINE["steps"])
METHODS = ["identity", "affine", *TIMED, *REFINED]


wildcard_constraints:
    variant="|".join(VARIANTS) or "none",
    model="|".join(MODELS),
    method="|".join(re.escape(m) for m in METHODS),


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
    method = re.sub(r"\+refine\d+$", "", wildcards.method)
    if method in ("identity", "peer_ants_syn") or method.startswith("optimise"):
        return []
    return model_file("teacher" if method == "affine" else method)


# cross-key checks the schema cannot express (ldreg.config_checks, the same ones the jobs run),
# so that a bad combination stops before any job runs
_problems = config_problems(config, MODELS)
if _problems:
    raise ValueError("config: " + "; ".join(_problems))
