from pathlib import Path

from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
pipeline.run_job(sm.log[0], sm.threads, pipeline.fetch_dataset, sm.params.spec, Path(sm.output.done).parent, sm.output.done)
