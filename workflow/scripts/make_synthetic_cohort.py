from pathlib import Path

from ldreg import pipeline

out = snakemake.output.manifest  # noqa: F821 (injected by Snakemake)
pipeline.run_job(snakemake.log[0], snakemake.threads, pipeline.make_synthetic,  # noqa: F821
                 snakemake.config, Path(out).parent, out, snakemake.threads)  # noqa: F821
