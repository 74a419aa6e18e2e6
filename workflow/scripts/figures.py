from pathlib import Path

from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
stem = lambda p: Path(p).name.split(".")[0]
evals = {stem(p).removesuffix("_pairs"): p for p in sm.input.evals}
losses = {stem(p).removesuffix("_loss"): p for p in sm.input.losses}
models = {stem(p): p for p in sm.input.models}
validation = {stem(p).removesuffix("_validation"): p for p in sm.input.validation}
pipeline.run_job(sm.log[0], sm.threads, pipeline.figures, sm.config, evals, sm.input.accuracy, losses, models,
                 sm.input.subjects, sm.input.pairs, sm.params.out_dir, validation)
