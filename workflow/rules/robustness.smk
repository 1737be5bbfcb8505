# Robustness sweep (evaluate.robustness): every perturbation of the evaluated split's images runs the whole
# prediction side of the DAG again with the SAME trained models, as a DAG dimension perturbation x shard, so results
# cache and rerun like every other stage. Two jobs per (perturbation, shard): `robust-predict` (perturb -> faces ->
# crops -> features -> both models, the main stages chained in one process) and `robust-evaluate` (fuse + evaluate
# every variant); then one tables job per perturbation (the main tables rule) and the reducer. Few jobs keep the
# planning of a DDL-I-sized DAG fast (BENCHMARKS.md). The clean column ("none") is the main run's own tables.
from morphfuse.perturb import sweep
from morphfuse.stages.chain import EVALUATE_KEYS as ROBUST_EVALUATE_KEYS, PREDICT_KEYS as ROBUST_PREDICT_KEYS

PERTURBATIONS = sweep(config["evaluate"]["robustness"])[1:]  # `none` is the main evaluation
PERTURB_IDS = [p.id for p in PERTURBATIONS]
PERTURB_SPEC = {p.id: p.spec for p in PERTURBATIONS}
ROBUST = config["predictions"]["source"] == "models" and bool(PERTURB_IDS)


wildcard_constraints:
    perturb=r"(jpeg|downscale|blur|noise)_[0-9.]+",


if ROBUST:

    rule robust_predict:
        input:
            shard=R("manifest/shards/{shard}.parquet"),
            lfdl=rules.predict_lfdl.input.model,  # the models the main predictions use
            mitl=rules.predict_mitl.input.model,
            weights=rules.faces.input.weights,
        output:
            lfdl_scores=RB("predict/lfdl/{shard}/scores.csv"),
            lfdl_masks=directory(RB("predict/lfdl/{shard}/masks")),
            mitl_scores=RB("predict/mitl/{shard}/scores.csv"),
            mitl_masks=directory(RB("predict/mitl/{shard}/masks")),
            crops=RB("crops/{shard}.parquet"),  # the perturbed images' crops (baseline_face's mask)
            ledger=R("ledger/robustness/{perturb}/predict/{shard}.csv"),
        log:
            R("logs/robustness/{perturb}/predict/{shard}.log"),
        conda:
            CONDA_ENV
        threads: 1
        resources:
            gpu=1,
        params:
            spec=lambda wc: PERTURB_SPEC[wc.perturb],
            out_lfdl=lambda wc: R("robustness", wc.perturb, "predict/lfdl", wc.shard),
            out_mitl=lambda wc: R("robustness", wc.perturb, "predict/mitl", wc.shard),
            work=lambda wc: R("robustness", wc.perturb, "work", wc.shard),
            config=config_slice(*ROBUST_PREDICT_KEYS),
            code=code("robust-predict"),
        shell:
            "OMP_NUM_THREADS={threads} morphfuse robust-predict --manifest {input.shard} --perturb {params.spec}"
            " --config {params.config:q} --lfdl-model {input.lfdl} --mitl-model {input.mitl}"
            " --out-lfdl {params.out_lfdl} --out-mitl {params.out_mitl} --work {params.work}"
            " --crops-out {output.crops} --ledger {output.ledger} > {log} 2>&1"

    rule robust_evaluate:
        input:
            shard=R("manifest/shards/{shard}.parquet"),  # ground truth: the clean shard's masks
            lfdl=rules.robust_predict.output.lfdl_masks,
            mitl=rules.robust_predict.output.mitl_masks,
            crops=rules.robust_predict.output.crops,
            thresholds=THRESHOLDS,
        output:
            counts=[RB("evaluate", v, "{shard}.parquet") for v in EVAL_VARIANTS],
        log:
            R("logs/robustness/{perturb}/evaluate/{shard}.log"),
        conda:
            CONDA_ENV
        params:
            lfdl=lambda wc: R("robustness", wc.perturb, "predict/lfdl", wc.shard),
            mitl=lambda wc: R("robustness", wc.perturb, "predict/mitl", wc.shard),
            fused=lambda wc: R("robustness", wc.perturb, "fuse"),
            counts=lambda wc: R("robustness", wc.perturb, "evaluate"),
            ledgers=lambda wc: R("ledger/robustness", wc.perturb, "evaluate"),
            thresholds=thresholds_arg(),
            config=config_slice(*ROBUST_EVALUATE_KEYS),
            code=code("robust-evaluate"),
        shell:
            "morphfuse robust-evaluate --manifest {input.shard} --lfdl {params.lfdl} --mitl {params.mitl}"
            " --crops {input.crops} --config {params.config:q} --fused {params.fused} --counts {params.counts}"
            " --ledgers {params.ledgers} {params.thresholds} > {log} 2>&1"

    use rule tables as tables_robust with:
        input:
            counts=lambda wc: [
                R("robustness", wc.perturb, "evaluate", v, f"{s}.parquet")
                for v in EVAL_VARIANTS
                for s in eval_shards()
            ],
            ledgers=lambda wc: [R("ledger/robustness", wc.perturb, "predict", f"{s}.csv") for s in eval_shards()],
            manifest=R("manifest/manifest.parquet"),
            thresholds=THRESHOLDS,
        output:
            table_md=RB("tables/ablation.md"),
            table_csv=RB("tables/ablation.csv"),
            roc=RB("figures/roc.png"),
            pr=RB("figures/pr.png"),
            panels=RB("figures/panels.png"),
        log:
            R("logs/robustness/{perturb}/tables.log"),
        params:
            **TABLES_PARAMS,
            out=lambda wc: R("robustness", wc.perturb, "tables"),
            figures=lambda wc: R("robustness", wc.perturb, "figures"),
            fused=lambda wc: R("robustness", wc.perturb, "fuse", PANEL_VARIANT),
            lfdl=lambda wc: R("robustness", wc.perturb, "predict/lfdl"),
            mitl=lambda wc: R("robustness", wc.perturb, "predict/mitl"),

    rule robustness:
        input:
            clean=rules.tables.output.table_csv,
            perturbed=expand(R("robustness", "{perturb}", "tables", "ablation.csv"), perturb=PERTURB_IDS),
        output:
            table_md=R("tables/robustness/robustness.md"),
            table_csv=R("tables/robustness/robustness.csv"),
            table_html=report(
                R("tables/robustness/robustness.html"), caption="../report/robustness.rst", category="8. Robustness"
            ),
            figure=report(R("figures/robustness.png"), caption="../report/robustness.rst", category="8. Robustness"),
        log:
            R("logs/robustness.log"),
        conda:
            CONDA_ENV
        params:
            ablation=lambda wc, input: " ".join(
                [f"none={input.clean}"] + [f"{p}={c}" for p, c in zip(PERTURB_IDS, input.perturbed)]
            ),
            out=lambda wc, output: str(Path(output.table_csv).parent),
            code=code("robustness"),
        shell:
            "morphfuse robustness --ablation {params.ablation} --out {params.out} --figure {output.figure} > {log} 2>&1"
