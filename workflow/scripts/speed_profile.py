from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
pipeline.run_job(sm.log[0], sm.threads, pipeline.speed_profile, sm.config, dict(zip(sm.config["speed_profile"]["models"], sm.input.models)),
                 sm.input.subjects, sm.input.pairs, sm.output[0], sm.output[2])
