rule evaluate:
    # ANTs registers with the threads it is given (ITK); the networks' evaluation is numpy-bound
    input:
        model=method_model,
        subjects=rules.preprocess.output.subjects,
        pairs=rules.preprocess.output.pairs,
    output:
        per_pair=f"{RESULTS}/eval/{{method}}_pairs.csv",
        per_label=f"{RESULTS}/eval/{{method}}_labels.csv",
    log:
        f"{RESULTS}/logs/evaluate_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_{{method}}.tsv"
    threads: lambda wildcards: all_cores() if wildcards.method == ANTS else slots(1)
    resources:
        mem_mb=3000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/evaluate.py"


rule time_ants:
    output:
        timing=f"{RESULTS}/timing/peer_ants_syn.csv",
    log:
        f"{RESULTS}/logs/time_cpu_peer_ants_syn.log",
    benchmark:
        f"{RESULTS}/benchmarks/time_ants.tsv"
    threads: all_cores
    resources:
        mem_mb=4000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/time_ants.py"


rule time_cpu:
    input:
        model=lambda wc: model_file(wc.model),
    output:
        timing=f"{RESULTS}/timing/{{model}}.csv",
    log:
        f"{RESULTS}/logs/time_cpu_{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/time_cpu_{{model}}.tsv"
    # all the run's cores: no other job shares the CPU while one is timed
    threads: all_cores
    resources:
        mem_mb=4000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/time_cpu.py"


rule benchmark_core:
    output:
        f"{RESULTS}/benchmarks/core.csv",
    log:
        f"{RESULTS}/logs/benchmark_core.log",
    threads: all_cores
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/benchmark_core.py"


rule speed_profile:
    # the register path stage by stage, per model x engine x grid x threads, with the Dice of
    # every engine on the test pairs (accuracy guard); all cores, so nothing else runs beside it
    input:
        models=lambda wc: [model_file(m) for m in config["speed_profile"]["models"]],
        subjects=rules.preprocess.output.subjects,
        pairs=rules.preprocess.output.pairs,
    output:
        report(multiext(f"{RESULTS}/tables/speed_profile", ".csv", ".md"), category="Tables"),
        report(multiext(f"{RESULTS}/tables/speed_machine", ".csv", ".md"), category="Tables"),
    log:
        f"{RESULTS}/logs/speed_profile.log",
    benchmark:
        f"{RESULTS}/benchmarks/speed_profile.tsv"
    threads: all_cores
    resources:
        mem_mb=6000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/speed_profile.py"
