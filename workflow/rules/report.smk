rule tables:
    input:
        evals=expand(f"{RESULTS}/eval/{{method}}_pairs.csv", method=METHODS),
        timings=expand(f"{RESULTS}/timing/{{model}}.csv", model=TIMED),
        models=expand(model_file("{model}"), model=MODELS),
    output:
        report(
            multiext(f"{RESULTS}/tables/accuracy", ".csv", ".md"),
            category="Tables",
        ),
        report(multiext(f"{RESULTS}/tables/speed", ".csv", ".md"), category="Tables"),
        report(multiext(f"{RESULTS}/tables/ablation", ".csv", ".md"), category="Tables"),
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{RESULTS}/logs/tables.log",
    threads: lambda wildcards: slots(1)
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/tables.py"


rule figures:
    input:
        evals=expand(f"{RESULTS}/eval/{{method}}_pairs.csv", method=METHODS),
        accuracy=f"{RESULTS}/tables/accuracy.csv",
        losses=[rules.train_teacher.output.losses]
        + expand(f"{RESULTS}/training/student_{{variant}}_loss.csv", variant=VARIANTS)
        + expand(f"{RESULTS}/training/{{model}}_loss.csv", model=[m for m in MODELS if m.startswith("peer_")]),
        validation=expand(f"{RESULTS}/training/{{model}}_validation.csv", model=MODELS),
        models=expand(model_file("{model}"), model=MODELS),
        subjects=rules.preprocess.output.subjects,
        pairs=rules.preprocess.output.pairs,
    output:
        report(
            expand(
                f"{RESULTS}/figures/{{name}}.png",
                name=["qualitative", "dice_boxplot", "accuracy_vs_time", "training_curves", "learning_curves"],
            ),
            category="Figures",
        ),
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{RESULTS}/logs/figures.log",
    threads: lambda wildcards: slots(1)
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/figures.py"
