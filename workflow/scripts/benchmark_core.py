from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
pipeline.run_job(sm.log[0], sm.threads, pipeline.benchmark_core, sm.config, sm.output[0])
