from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
pipeline.run_job(sm.log[0], sm.threads, pipeline.cache_flows, sm.config, sm.input.model, sm.input.subjects,
                 sm.input.pairs, sm.output.flows, sm.params.refine)
