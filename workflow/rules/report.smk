# tables + models -> report inputs (training curves, contact sheets, ledger counts, provenance) and the model bundle
rule report:
    input:
        table=rules.tables.output.table_csv,
        models=[R("models", m, "metrics.csv") for m in ("lfdl", "mitl")],
        manifest=R("manifest/manifest.parquet"),
        config=rules.effective_config.output,
    output:
        curves=report(R("report/training_curves.png"), caption="../report/training.rst", category="4. Training"),
        ablation=report(R("report/ablation.html"), caption="../report/ablation.rst", category="1. Ablation"),
        ledger=report(R("report/ledger_counts.csv"), caption="../report/ledger.rst", category="6. Errors"),
        sheets=[report(R("report", f"contact_sheet_{m}.png"), caption="../report/contact_sheet.rst",
                       category="5. Forgeries", subcategory=m) for m in config["forge"]["methods"]],
        attribution=report(R("report/attribution.html"), caption="../report/attribution.rst", category="7. Data"),
        provenance=R("provenance.json"),
    params:
        out=R("report"),
        run=str(RUN),
        code=code("report"),
    conda:
        CONDA_ENV
    log:
        R("logs/report.log"),
    shell:
        "{MF} report --run-dir {params.run} --config {input.config} --out {params.out} > {log} 2>&1"


rule export:
    input:
        lfdl=R("models/lfdl/model.pt"),
        mitl=R("models/mitl/model.pt"),
        tables=rules.tables.output.table_md,
        manifest=R("manifest/manifest.parquet"),
        config=rules.effective_config.output,
    output:
        bundle=directory(R("bundle")),
    params:
        tables=R("tables"),
        code=code("export"),
    conda:
        CONDA_ENV
    log:
        R("logs/export.log"),
    shell:
        "{MF} export --lfdl {input.lfdl} --mitl {input.mitl} --config {input.config} --out {output.bundle}"
        " --tables {params.tables} --manifest {input.manifest} > {log} 2>&1"
