rule make_synthetic_cohort:
    output:
        manifest=f"{RESOURCES}/synthetic/subjects.csv",
    params:
        # the cohort's settings: a change makes it again (Snakemake's params trigger); a second
        # cohort kept beside the default one needs a resources_dir of its own
        settings={"seed": config["seed"], **config["data"]["synthetic"]},
    log:
        f"{RESULTS}/logs/make_synthetic_cohort.log",
    benchmark:
        f"{RESULTS}/benchmarks/make_synthetic_cohort.tsv"
    threads: all_cores
    resources:
        mem_mb=2000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/make_synthetic_cohort.py"


rule download_dataset:
    output:
        done=f"{RESOURCES}/{{dataset}}/.done",
    wildcard_constraints:
        dataset="|".join(config["data"]["downloads"]) or "none",
    log:
        f"{RESULTS}/logs/download_{{dataset}}.log",
    params:
        spec=lambda wc: config["data"]["downloads"][wc.dataset],
    threads: lambda wildcards: slots(1)
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/download_dataset.py"


rule preprocess:
    input:
        source_input,
    output:
        subjects=f"{RESULTS}/data/subjects.csv",
        pairs=f"{RESULTS}/data/pairs.csv",
        volumes=directory(f"{RESULTS}/data/preprocessed"),
    params:
        source_root=source_root(),
    log:
        f"{RESULTS}/logs/preprocess.log",
    benchmark:
        f"{RESULTS}/benchmarks/preprocess.tsv"
    threads: all_cores
    resources:
        mem_mb=4000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/preprocess.py"
