# morphfuse: LFDL + MITL fused by morphology (MDMF), as a sharded Snakemake workflow.
# Run:  snakemake --cores all                       (one machine; profiles/default is loaded automatically)
#       snakemake --workflow-profile profiles/slurm  (SLURM; see README "Running on a SLURM cluster")
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/faces.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/fusion.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/robustness.smk"
include: "workflow/rules/bulk.smk"


rule all:
    default_target: True
    input:
        rules.tables.output,
        rules.report.output,
        rules.export.output,
        rules.robustness.output if ROBUST else [],
