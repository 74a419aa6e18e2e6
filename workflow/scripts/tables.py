from pathlib import Path

from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
stem = lambda p: Path(p).name.split(".")[0]
evals = {stem(p).removesuffix("_pairs"): p for p in sm.input.evals}
timings = {stem(p): p for p in sm.input.timings}
models = {stem(p): p for p in sm.input.models}
pipeline.run_job(sm.log[0], sm.threads, pipeline.tables, sm.config, evals, timings, models, sm.params.out_dir)
