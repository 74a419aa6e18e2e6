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
    # compute-bound: the job takes every core it is given (capped at the machine's), and jobs
    # that would only fight over the same cores wait
    threads: workflow.cores
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
        # a changed refinement rebuilds the targets (--rerun-triggers params); without refinement
        # its other options do not matter and do not trigger a rebuild
        refine=config["teacher_cache"]["refine"] if config["teacher_cache"]["refine"]["steps"] else {"steps": 0},
    log:
        f"{RESULTS}/logs/cache_teacher_flows.log",
    benchmark:
        f"{RESULTS}/benchmarks/cache_teacher_flows.tsv"
    threads: workflow.cores
    resources:
        mem_mb=4000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/cache_teacher_flows.py"
