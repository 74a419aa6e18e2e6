from ldreg import pipeline

sm = snakemake  # noqa: F821 (injected by Snakemake)
evals = {cohort: list(sm.input[cohort]) for cohort in ("cohort", "real") if cohort in sm.input.keys()}
pipeline.run_job(sm.log[0], 1, pipeline.native_tables, sm.config, evals, sm.params.out_dir, sm.output.figure)
