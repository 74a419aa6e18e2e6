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


envvars:
    # set by the workflow itself (common.smk) and handed to the jobs: no user needs to set it
    "LDREG_SLOTS_PER_THREAD",


# not in `all` (2.5 min alone at the end of the 2-core default run): snakemake --cores 2 benchmark_core
