# fused masks -> per-shard per-image counts -> ablation tables, ROC/PR, qualitative panels
from morphfuse.evaluate import convention_arguments, detection_scores_of
from morphfuse.tables import panel_variant

EV = config["evaluate"]
CONVENTION = convention_arguments(EV)


PANEL_VARIANT = panel_variant(config["fusion"]["variants"])


rule evaluate:
    input:
        shard=R("manifest/shards/{shard}.parquet"),
        masks=R("fuse/{variant}/{shard}/masks"),
        scores=lambda wc: R("predict", detection_scores_of(wc.variant), wc.shard, "scores.csv"),
    output:
        counts=R("evaluate/{variant}/{shard}.parquet"),
        ledger=R("ledger/evaluate/{variant}_{shard}.csv"),
    log:
        R("logs/evaluate/{variant}_{shard}.log"),
    wildcard_constraints:
        variant=r"(?!baseline_)[a-z_]+",  # the baselines have a rule of their own (evaluate_baseline)
    conda:
        CONDA_ENV
    params:
        convention=CONVENTION,
        split=EVAL_SPLIT,
        code=code("evaluate"),
    shell:
        "morphfuse evaluate --manifest {input.shard} --pred-masks {input.masks} --scores {input.scores}"
        " --out-counts {output.counts} --variant {wildcards.variant} --split {params.split}"
        " --ledger {output.ledger} --allow-errors {params.convention} > {log} 2>&1"


# Baselines (evaluate.baselines): baseline_face = the image's face crops as its mask, baseline_all = the whole image;
# score 0.5 for every image. Evaluated like a variant, from the same shard and crops the models saw.
BASELINES = config["evaluate"]["baselines"]
EVAL_VARIANTS = list(config["fusion"]["variants"]) + list(BASELINES)


ruleorder: evaluate_baseline > evaluate


rule evaluate_baseline:
    input:
        shard=R("manifest/shards/{shard}.parquet"),
        crops=R("crops/{shard}.parquet"),  # baseline_face: its mask; both: the images the models saw
    output:
        counts=R("evaluate/{baseline}/{shard}.parquet"),
        ledger=R("ledger/evaluate/{baseline}_{shard}.csv"),
    log:
        R("logs/evaluate/{baseline}_{shard}.log"),
    wildcard_constraints:
        baseline="baseline_face|baseline_all",
    conda:
        CONDA_ENV
    params:
        convention=CONVENTION,
        split=EVAL_SPLIT,
        kind=lambda wc: wc.baseline.removeprefix("baseline_"),
        code=code("evaluate"),
    shell:
        "morphfuse evaluate --manifest {input.shard} --baseline {params.kind} --crops {input.crops}"
        " --out-counts {output.counts} --variant {wildcards.baseline} --split {params.split}"
        " --ledger {output.ledger} --allow-errors {params.convention} > {log} 2>&1"


# Parameters of the tables rule that are not paths (shared with the robustness sweep's copy of it).
TABLES_PARAMS = dict(
    fused_variant=PANEL_VARIANT,
    bootstrap=EV["bootstrap"],
    panels=EV["panels"],
    seed=config["seed"],
    convention=CONVENTION,
    thresholds=thresholds_arg(),
    code=code("tables"),
)


rule tables:
    input:
        counts=lambda wc: [R("evaluate", v, f"{s}.parquet") for v in EVAL_VARIANTS for s in eval_shards()],
        ledgers=all_ledgers,
        manifest=R("manifest/manifest.parquet"),
        thresholds=THRESHOLDS,
    output:
        table_md=R("tables/ablation.md"),
        table_csv=R("tables/ablation.csv"),  # shown in the report as report/ablation.html (a CSV item is a download)
        roc=report(R("figures/roc.png"), caption="../report/roc.rst", category="2. Detection"),
        pr=report(R("figures/pr.png"), caption="../report/pr.rst", category="2. Detection"),
        panels=report(R("figures/panels.png"), caption="../report/panels.rst", category="3. Localization"),
    log:
        R("logs/tables.log"),
    conda:
        CONDA_ENV
    params:
        **TABLES_PARAMS,
        out=lambda wc, output: str(Path(output.table_csv).parent),
        figures=lambda wc, output: str(Path(output.roc).parent),
        fused=R("fuse", PANEL_VARIANT),
        lfdl=R("predict/lfdl"),
        mitl=R("predict/mitl"),
    shell:
        "morphfuse tables --counts {input.counts} --ledgers {input.ledgers} --out {params.out}"
        " --figures {params.figures} --bootstrap {params.bootstrap} --seed {params.seed} {params.convention}"
        " --panels {params.panels} --manifest {input.manifest} --lfdl-masks {params.lfdl}"
        " --mitl-masks {params.mitl} --fused-masks {params.fused} --fused-variant {params.fused_variant}"
        " {params.thresholds} > {log} 2>&1"
