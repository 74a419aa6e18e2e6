# LDR + ALDK: distil a recursive cascaded teacher into a light student for CPU registration.
# Run everything on the embedded default:  snakemake --cores all all
import os

from snakemake.utils import min_version, validate

min_version("8.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/student.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/native.smk"
include: "workflow/rules/batch.smk"


rule all:
    input:
        rules.tables.output,
        rules.figures.output,
        rules.speed_profile.output,
        rules.native_tables.output if NATIVE_COHORTS else [],
        rules.register_batch.output.summary if config["batch"]["enabled"] else [],
    default_target: True


# the run's duration on this CPU, said when it starts (ldreg.estimate) and checked when it ends
onstart:
    RUN_STARTED["at"] = time.time()
    # --touch marks outputs up to date without running anything: no run to estimate or record
    if workflow.local_exec and not workflow.touch:
        # a few seconds of calibration; never in the way of the run itself
        try:
            from ldreg.engines import cpu_summary
            from ldreg.estimate import announce

            RUN_STARTED["estimate"] = announce(planned_jobs(), requested_cores() or 1, config["preprocessing"]["grid"],
                                               f"{RESULTS}/logs/estimate.log")
            logger.info(f"{RUN_STARTED['estimate'].message(cpu_summary())} ({RESULTS}/logs/estimate.log)")
        except Exception as exc:  # noqa: BLE001 (an estimate is advice: the run goes on without one)
            logger.warning(f"no duration estimate: {type(exc).__name__}: {exc}")


onsuccess:
    if "estimate" in RUN_STARTED:
        from ldreg.engines import cpu_summary
        from ldreg.estimate import record_run

        took = time.time() - RUN_STARTED["at"]
        with open(f"{RESULTS}/logs/estimate.log", "a") as out:
            out.write(f"the run took {took / 60:.1f} min\n")
        record_run(f"{RESULTS}/logs/run_durations.csv", RUN_STARTED["at"], took, RUN_STARTED["estimate"],
                   run_targets(), cpu_summary())
        logger.info(f"the run took {took / 60:.1f} min (estimate and history: {RESULTS}/logs/)")


# every switched-on student variant (students.variants), paired tests and all: results/ablation/
rule ablation:
    input:
        rules.ablation_tables.output,
        rules.ablation_figures.output,
        rules.ablation_native_tables.output if NATIVE_COHORTS else [],


envvars:
    # set by the workflow itself (common.smk) and handed to the jobs: no user needs to set it
    "LDREG_SLOTS_PER_THREAD",


# not in `all` (2.5 min alone at the end of the 2-core default run): snakemake --cores 2 benchmark_core
