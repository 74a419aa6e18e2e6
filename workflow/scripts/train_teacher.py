from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
pipeline.run_job(sm.log[0], sm.threads, pipeline.train_teacher, sm.config, sm.input.subjects, sm.input.pairs,
                 sm.output.model, sm.output.losses, sm.params.checkpoint, sm.output.validation)
