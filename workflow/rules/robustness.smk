# Robustness sweep (evaluate.robustness): every perturbation of the evaluated split's images runs the whole
# prediction side of the DAG again (faces -> crops -> features -> predict -> fuse -> evaluate -> tables) with the
# SAME trained models, as a DAG dimension perturbation x shard, so results cache and rerun like every other stage.
# The clean column ("none") is the main run's own tables. Each stage is the main rule itself (`use rule`), with
# paths under robustness/{perturb}/.
from morphfuse.perturb import sweep

PERTURBATIONS = sweep(config["evaluate"]["robustness"])[1:]  # `none` is the main evaluation
PERTURB_IDS = [p.id for p in PERTURBATIONS]
PERTURB_SPEC = {p.id: p.spec for p in PERTURBATIONS}
ROBUST = config["predictions"]["source"] == "models" and bool(PERTURB_IDS)


def RB(*parts):
    """A path of the robustness sweep: results/<run>/robustness/{perturb}/..."""
    return R("robustness", "{perturb}", *parts)


wildcard_constraints:
    perturb=r"(jpeg|downscale|blur|noise)_[0-9.]+",


if ROBUST:

    rule perturb:
        input:
            shard=R("manifest/shards/{shard}.parquet"),
        output:
            shard=RB("manifest/{shard}.parquet"),
            ledger=R("ledger/robustness/{perturb}/perturb/{shard}.csv"),
        params:
            spec=lambda wc: PERTURB_SPEC[wc.perturb],
            images=lambda wc: R("robustness", wc.perturb, "images", wc.shard),
            seed=config["seed"],
            code=code("perturb"),
        conda:
            CONDA_ENV
        log:
            R("logs/robustness/{perturb}/perturb/{shard}.log"),
        shell:
            "{MF} perturb --manifest {input.shard} --perturb {params.spec} --seed {params.seed}"
            " --images {params.images} --out {output.shard} --ledger {output.ledger} > {log} 2>&1"

    use rule faces as faces_robust with:
        input:
            shard=rules.perturb.output.shard,
            weights=rules.faces.input.weights,
        output:
            faces=RB("faces/{shard}.parquet"),
            ledger=R("ledger/robustness/{perturb}/faces/{shard}.csv"),
        log:
            R("logs/robustness/{perturb}/faces/{shard}.log"),

    use rule crops as crops_robust with:
        input:
            shard=rules.perturb.output.shard,
            faces=rules.faces_robust.output.faces,
            faces_ledger=rules.faces_robust.output.ledger,
        output:
            crops=RB("crops/{shard}.parquet"),
            ledger=R("ledger/robustness/{perturb}/crops/{shard}.csv"),
        log:
            R("logs/robustness/{perturb}/crops/{shard}.log"),

    use rule features_lfdl as features_lfdl_robust with:
        input:
            shard=rules.perturb.output.shard,
            crops=rules.crops_robust.output.crops,
        output:
            npz=RB("features/lfdl/{shard}.npz"),
            ledger=R("ledger/robustness/{perturb}/features_lfdl/{shard}.csv"),
        log:
            R("logs/robustness/{perturb}/features_lfdl/{shard}.log"),

    use rule features_mitl as features_mitl_robust with:
        input:
            shard=rules.perturb.output.shard,
        output:
            npz=RB("features/mitl/{shard}.npz"),
            ledger=R("ledger/robustness/{perturb}/features_mitl/{shard}.csv"),
        log:
            R("logs/robustness/{perturb}/features_mitl/{shard}.log"),

    use rule predict_lfdl as predict_lfdl_robust with:
        input:
            model=R("models/lfdl/model.pt"),
            features=RB("features/lfdl/{shard}.npz"),
            shard=rules.perturb.output.shard,
        output:
            scores=RB("predict/lfdl/{shard}/scores.csv"),
            masks=directory(RB("predict/lfdl/{shard}/masks")),
        params:
            **PREDICT_PARAMS["lfdl"],
            out=lambda wc: R("robustness", wc.perturb, "predict/lfdl", wc.shard),
        log:
            R("logs/robustness/{perturb}/predict_lfdl/{shard}.log"),

    use rule predict_mitl as predict_mitl_robust with:
        input:
            model=R("models/mitl/model.pt"),
            features=RB("features/mitl/{shard}.npz"),
            shard=rules.perturb.output.shard,
        output:
            scores=RB("predict/mitl/{shard}/scores.csv"),
            masks=directory(RB("predict/mitl/{shard}/masks")),
        params:
            **PREDICT_PARAMS["mitl"],
            out=lambda wc: R("robustness", wc.perturb, "predict/mitl", wc.shard),
        log:
            R("logs/robustness/{perturb}/predict_mitl/{shard}.log"),

    use rule fuse as fuse_robust with:
        input:
            lfdl=RB("predict/lfdl/{shard}/masks"),
            mitl=RB("predict/mitl/{shard}/masks"),
        output:
            masks=directory(RB("fuse/{variant}/{shard}/masks")),
            ledger=R("ledger/robustness/{perturb}/fuse/{variant}_{shard}.csv"),
        log:
            R("logs/robustness/{perturb}/fuse/{variant}_{shard}.log"),

    use rule evaluate as evaluate_robust with:
        input:
            shard=R("manifest/shards/{shard}.parquet"),  # ground truth: the clean shard's masks
            masks=RB("fuse/{variant}/{shard}/masks"),
            scores=lambda wc: R("robustness", wc.perturb, "predict", _scores_for(wc.variant), wc.shard,
                                "scores.csv"),
        output:
            counts=RB("evaluate/{variant}/{shard}.parquet"),
            ledger=R("ledger/robustness/{perturb}/evaluate/{variant}_{shard}.csv"),
        log:
            R("logs/robustness/{perturb}/evaluate/{variant}_{shard}.log"),

    use rule tables as tables_robust with:
        input:
            counts=lambda wc: [R("robustness", wc.perturb, "evaluate", v, f"{s}.parquet")
                               for v in config["fusion"]["variants"] for s in eval_shards()],
            ledgers=lambda wc: [R("ledger/robustness", wc.perturb, st, f"{s}.csv")
                                for st in ("perturb", "faces", "crops", "features_lfdl", "features_mitl")
                                for s in eval_shards()],
            manifest=R("manifest/manifest.parquet"),
        output:
            table_md=RB("tables/ablation.md"),
            table_csv=RB("tables/ablation.csv"),
            roc=RB("figures/roc.png"),
            pr=RB("figures/pr.png"),
            panels=RB("figures/panels.png"),
        params:
            **TABLES_PARAMS,
            out=lambda wc: R("robustness", wc.perturb, "tables"),
            figures=lambda wc: R("robustness", wc.perturb, "figures"),
            fused=lambda wc: R("robustness", wc.perturb, "fuse", PANEL_VARIANT),
            lfdl=lambda wc: R("robustness", wc.perturb, "predict/lfdl"),
            mitl=lambda wc: R("robustness", wc.perturb, "predict/mitl"),
        log:
            R("logs/robustness/{perturb}/tables.log"),

    rule robustness:
        input:
            clean=rules.tables.output.table_csv,
            perturbed=expand(R("robustness", "{perturb}", "tables", "ablation.csv"), perturb=PERTURB_IDS),
        output:
            table_md=R("tables/robustness/robustness.md"),
            table_csv=report(R("tables/robustness/robustness.csv"), caption="../report/robustness.rst",
                             category="8. Robustness"),
            figure=report(R("figures/robustness.png"), caption="../report/robustness.rst", category="8. Robustness"),
        params:
            ablation=lambda wc, input: " ".join([f"none={input.clean}"] + [f"{p}={c}" for p, c in zip(PERTURB_IDS,
                                                                                                       input.perturbed)]),
            out=R("tables/robustness"),
            code=code("robustness"),
        conda:
            CONDA_ENV
        log:
            R("logs/robustness.log"),
        shell:
            "{MF} robustness --ablation {params.ablation} --out {params.out} --figure {output.figure} > {log} 2>&1"
