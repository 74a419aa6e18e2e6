from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
pipeline.run_job(sm.log[0], sm.threads, pipeline.preprocess, sm.config, sm.params.source_root, sm.output.volumes,
                 sm.output.subjects, sm.output.pairs, sm.threads)
