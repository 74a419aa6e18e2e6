from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
pipeline.run_job(sm.log[0], sm.threads, pipeline.register_batch, sm.config, sm.input.model, sm.input.pairs or None,
                 sm.params.out_dir)
