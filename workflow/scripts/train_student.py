from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
pipeline.run_job(sm.log[0], sm.threads, pipeline.train_student, sm.config, sm.wildcards.variant, sm.input.subjects,
                 sm.input.pairs, sm.input.flows or None, sm.output.model, sm.output.losses, sm.params.checkpoint,
                 sm.output.validation)
