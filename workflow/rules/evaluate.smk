# fused masks -> per-shard per-image counts -> ablation tables, ROC/PR, qualitative panels

EV = config["evaluate"]
CONVENTION = (f"--averaging {EV['averaging']} --images {EV['images']} --iou {EV['iou']} --empty {EV['empty']}"
              f" --threshold {EV['threshold']}")


# The fused variant shown in the qualitative panels: MDMF when it is run.
PANEL_VARIANT = "mdmf" if "mdmf" in config["fusion"]["variants"] else config["fusion"]["variants"][-1]


def _scores_for(variant):
    # Detection comes from LFDL (the paper); the `mitl` row scores images from its own mask.
    return "mitl" if variant == "mitl" else "lfdl"


rule evaluate:
    input:
        shard=R("manifest/shards/{shard}.parquet"),
        masks=R("fuse/{variant}/{shard}/masks"),
        scores=lambda wc: R("predict", _scores_for(wc.variant), wc.shard, "scores.csv"),
    output:
        counts=R("evaluate/{variant}/{shard}.parquet"),
        ledger=R("ledger/evaluate/{variant}_{shard}.csv"),
    params:
        convention=CONVENTION,
        split=EVAL_SPLIT,
        code=code("evaluate"),
    conda:
        CONDA_ENV
    log:
        R("logs/evaluate/{variant}_{shard}.log"),
    shell:
        "{MF} evaluate --manifest {input.shard} --pred-masks {input.masks} --scores {input.scores}"
        " --out-counts {output.counts} --variant {wildcards.variant} --split {params.split}"
        " --ledger {output.ledger} --allow-errors {params.convention} > {log} 2>&1"


# Parameters of the tables rule that are not paths (shared with the robustness sweep's copy of it).
TABLES_PARAMS = dict(fused_variant=PANEL_VARIANT, bootstrap=EV["bootstrap"], panels=EV["panels"], seed=config["seed"],
                     convention=CONVENTION, code=code("tables"))


def _all_ledgers(wildcards):
    shards = shard_ids()
    out = [R("ledger/index/index.csv")]
    out += [R("ledger/forge", f"{m}_{k}.csv") for m in config["forge"]["methods"] for k in forge_shard_ids()]
    out += [R("ledger", st, f"{s}.csv") for st in ("faces", "crops", "features_lfdl", "features_mitl") for s in shards]
    out += [R("ledger", st, f"{v}_{s}.csv") for st in ("fuse", "evaluate")
            for v in config["fusion"]["variants"] for s in eval_shards()]
    return out


rule tables:
    input:
        counts=lambda wc: [R("evaluate", v, f"{s}.parquet") for v in config["fusion"]["variants"] for s in eval_shards()],
        ledgers=_all_ledgers,
        manifest=R("manifest/manifest.parquet"),
    output:
        table_md=R("tables/ablation.md"),
        table_csv=report(R("tables/ablation.csv"), caption="../report/ablation.rst", category="1. Ablation"),
        roc=report(R("figures/roc.png"), caption="../report/roc.rst", category="2. Detection"),
        pr=report(R("figures/pr.png"), caption="../report/pr.rst", category="2. Detection"),
        panels=report(R("figures/panels.png"), caption="../report/panels.rst", category="3. Localization"),
    params:
        **TABLES_PARAMS,
        out=R("tables"),
        figures=R("figures"),
        fused=R("fuse", PANEL_VARIANT),
        lfdl=R("predict/lfdl"),
        mitl=R("predict/mitl"),
    conda:
        CONDA_ENV
    log:
        R("logs/tables.log"),
    shell:
        "{MF} tables --counts {input.counts} --ledgers {input.ledgers} --out {params.out}"
        " --figures {params.figures} --bootstrap {params.bootstrap} --seed {params.seed} {params.convention}"
        " --panels {params.panels} --manifest {input.manifest} --lfdl-masks {params.lfdl}"
        " --mitl-masks {params.mitl} --fused-masks {params.fused} --fused-variant {params.fused_variant}"
        " > {log} 2>&1"

