from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
pipeline.run_job(sm.log[0], sm.threads, pipeline.evaluate_native, sm.config, sm.wildcards.method, sm.input.model or None,
                 sm.input.pairs, sm.output.per_pair, sm.output.per_label, sm.wildcards.cohort, sm.params.source_root,
                 sm.threads)
