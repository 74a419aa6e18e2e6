# register-batch as a workflow target: the `batch` config's pairs (by default the real-anatomy
# check's) registered in one process with the chosen model; summary, QC pictures and their page.
# Your own scans: snakemake --cores all register_batch --config batch='{"moving_dir": "scans", "fixed": "t1.nii.gz"}'


rule register_batch:
    input:
        model=batch_model,
        pairs=batch_pairs,
    output:
        summary=report(f"{RESULTS}/batch/summary.csv", category="Batch"),
        page=report(f"{RESULTS}/batch/report.md", category="Batch") if config["batch"]["qc"] else [],
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    log:
        f"{RESULTS}/logs/register_batch.log",
    benchmark:
        f"{RESULTS}/benchmarks/register_batch.tsv"
    threads: all_cores
    resources:
        mem_mb=4000,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/register_batch.py"
