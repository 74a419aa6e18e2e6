# Accuracy where users register: the scan's own resolution, through register's path, every
# method timed end to end on the same files and threads (ldreg.native).


rule make_real_anatomy:
    # a real subject no model saw (Colin27 + AAL from Debian's mricron-data), moved by seeded
    # smooth deformations; a clear error names the package when the files are absent
    output:
        pairs=f"{RESOURCES}/real_anatomy/pairs.csv",
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.pairs),
        # its settings and the run's seed (the moved copies' draws): a change makes them again
        settings={"seed": config["seed"], **config["real_anatomy"]},
    log:
        f"{RESULTS}/logs/make_real_anatomy.log",
    benchmark:
        f"{RESULTS}/benchmarks/make_real_anatomy.tsv"
    threads: lambda wildcards: slots(1)
    resources:
        mem_mb=3000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/make_real_anatomy.py"


rule evaluate_native:
    input:
        model=method_model,
        pairs=lambda wc: rules.make_real_anatomy.output.pairs if wc.cohort == "real" else rules.preprocess.output.pairs,
        # the cohort's subjects before preprocessing (their own resolution)
        source=source_input,
    output:
        per_pair=f"{RESULTS}/eval_native/{{cohort}}/{{method}}_pairs.csv",
        per_label=f"{RESULTS}/eval_native/{{cohort}}/{{method}}_labels.csv",
    params:
        source_root=source_root(),
    log:
        f"{RESULTS}/logs/evaluate_native_{{cohort}}_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_native_{{cohort}}_{{method}}.tsv"
    # every method on all the run's cores, alone: its seconds are a claim
    threads: all_cores
    resources:
        mem_mb=6000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/evaluate_native.py"


rule native_tables:
    input:
        **{c: expand(f"{RESULTS}/eval_native/{c}/{{method}}_pairs.csv", method=NATIVE_METHODS) for c in NATIVE_COHORTS},
    output:
        report(multiext(f"{RESULTS}/tables/accuracy_native", ".csv", ".md"), category="Tables"),
        *([report(multiext(f"{RESULTS}/tables/accuracy_real", ".csv", ".md"), category="Tables")]
          if "real" in NATIVE_COHORTS else []),
        figure=report(f"{RESULTS}/figures/accuracy_vs_time_native.png", category="Figures"),
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{RESULTS}/logs/native_tables.log",
    threads: lambda wildcards: slots(1)
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/native_tables.py"


use rule native_tables as ablation_native_tables with:
    input:
        **{c: expand(f"{RESULTS}/eval_native/{c}/{{method}}_pairs.csv", method=ABLATION["native_methods"])
           for c in NATIVE_COHORTS},
    output:
        report(multiext(f"{ABLATION_DIR}/tables/accuracy_native", ".csv", ".md"), category="Ablation"),
        *([report(multiext(f"{ABLATION_DIR}/tables/accuracy_real", ".csv", ".md"), category="Ablation")]
          if "real" in NATIVE_COHORTS else []),
        figure=report(f"{ABLATION_DIR}/figures/accuracy_vs_time_native.png", category="Ablation"),
    log:
        f"{RESULTS}/logs/ablation_native_tables.log",
