rule train_teacher:
    input:
        subjects=rules.preprocess.output.subjects,
        pairs=rules.preprocess.output.pairs,
    output:
        model=model_file("teacher"),
        losses=f"{RESULTS}/training/teacher_loss.csv",
        validation=f"{RESULTS}/training/teacher_validation.csv",
    params:
        # outside the outputs, so a failed or interrupted job keeps it and the rerun resumes
        checkpoint=f"{RESULTS}/checkpoints/teacher.ckpt",
    log:
        f"{RESULTS}/logs/train_teacher.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_teacher.tsv"
    threads: train_threads
    # on the critical path (the cache and four students wait for it): started before the jobs
    # that can run beside it
    priority: 10
    resources:
        mem_mb=6000,
        gpu=0,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/train_teacher.py"


rule cache_teacher_flows:
    input:
        model=rules.train_teacher.output.model,
        subjects=rules.preprocess.output.subjects,
        pairs=rules.preprocess.output.pairs,
    output:
        flows=f"{RESULTS}/cache/teacher_flows.pt",
    params:
        # the teacher's fields as it gives them (the paper's targets)
        refine={"steps": 0},
    log:
        f"{RESULTS}/logs/cache_teacher_flows.log",
    benchmark:
        f"{RESULTS}/benchmarks/cache_teacher_flows.tsv"
    # half the cores, like a training job: asking for all of them, it waited 6.5 min for the
    # VoxelMorph job to free its core while 1-thread evaluations filled the other (default run,
    # 2 cores), and the distilling and adversarial students waited with it
    threads: train_threads
    priority: 10
    resources:
        mem_mb=4000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/cache_teacher_flows.py"


# each cached field refined on its pair (beyond the paper), for the variants with targets: refined;
# a changed refinement rebuilds these targets (--rerun-triggers params)
use rule cache_teacher_flows as cache_refined_teacher_flows with:
    output:
        flows=f"{RESULTS}/cache/teacher_flows_refined.pt",
    params:
        refine=config["teacher_cache"]["refine"],
    log:
        f"{RESULTS}/logs/cache_refined_teacher_flows.log",
    benchmark:
        f"{RESULTS}/benchmarks/cache_refined_teacher_flows.tsv"
