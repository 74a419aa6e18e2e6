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
        losses=expand(f"{RESULTS}/training/{{model}}_loss.csv", model=MODELS),
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


# The full ablation (snakemake --cores all ablation): every switched-on student variant, on top of
# what `all` trains and scores (shared files are not redone), its tables and figures under
# results/ablation/ with a paired test of each teacher-taught student against its unsupervised twin
ABLATION_DIR = f"{RESULTS}/ablation"


use rule tables as ablation_tables with:
    input:
        evals=expand(f"{RESULTS}/eval/{{method}}_pairs.csv", method=ABLATION["methods"]),
        timings=expand(f"{RESULTS}/timing/{{model}}.csv", model=ABLATION["timed"]),
        models=expand(model_file("{model}"), model=ABLATION["models"]),
    output:
        report(multiext(f"{ABLATION_DIR}/tables/accuracy", ".csv", ".md"), category="Ablation"),
        report(multiext(f"{ABLATION_DIR}/tables/speed", ".csv", ".md"), category="Ablation"),
        report(multiext(f"{ABLATION_DIR}/tables/ablation", ".csv", ".md"), category="Ablation"),
    log:
        f"{RESULTS}/logs/ablation_tables.log",


use rule figures as ablation_figures with:
    input:
        evals=expand(f"{RESULTS}/eval/{{method}}_pairs.csv", method=ABLATION["methods"]),
        accuracy=f"{ABLATION_DIR}/tables/accuracy.csv",
        losses=expand(f"{RESULTS}/training/{{model}}_loss.csv", model=ABLATION["models"]),
        validation=expand(f"{RESULTS}/training/{{model}}_validation.csv", model=ABLATION["models"]),
        models=expand(model_file("{model}"), model=ABLATION["models"]),
        subjects=rules.preprocess.output.subjects,
        pairs=rules.preprocess.output.pairs,
    output:
        report(
            expand(
                f"{ABLATION_DIR}/figures/{{name}}.png",
                name=["qualitative", "dice_boxplot", "accuracy_vs_time", "training_curves", "learning_curves"],
            ),
            category="Ablation",
        ),
    log:
        f"{RESULTS}/logs/ablation_figures.log",
