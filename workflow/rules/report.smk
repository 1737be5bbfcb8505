# tables + models -> report inputs (training curves, contact sheets, ledger counts, provenance) and the model bundle
# The effective config (config.yaml + --configfile/--config + schema defaults), written by a rule of its own, read
# by the report and the bundle; it is rewritten only when the config changes (its param), never at parse time.
rule effective_config:
    output:
        R("config.effective.yaml"),
    log:
        R("logs/effective_config.log"),
    localrule: True
    conda:
        CONDA_ENV
    params:
        config=config_slice(*sorted(config)),
        code=code("config"),
    shell:
        "morphfuse config --config {params.config:q} --out {output} > {log} 2>&1"


rule report:
    input:
        table=rules.tables.output.table_csv,
        models=[R("models", m, "metrics.csv") for m in ("lfdl", "mitl")],
        manifest=R("manifest/manifest.parquet"),
        config=rules.effective_config.output,
    output:
        curves=report(R("report/training_curves.png"), caption="../report/training.rst", category="4. Training"),
        ablation=report(R("report/ablation.html"), caption="../report/ablation.rst", category="1. Ablation"),
        ledger=R("report/ledger_counts.csv"),
        errors=report(R("report/errors.html"), caption="../report/ledger.rst", category="6. Errors"),
        sheets=[
            report(
                R("report", f"contact_sheet_{m}.png"),
                caption="../report/contact_sheet.rst",
                category="5. Forgeries",
                subcategory=m,
            )
            for m in config["forge"]["methods"]
        ],
        attribution=report(R("report/attribution.html"), caption="../report/attribution.rst", category="7. Data"),
        config=report(R("report/config.html"), caption="../report/config.rst", category="0. Run"),
        provenance_html=report(R("report/provenance.html"), caption="../report/provenance.rst", category="0. Run"),
        provenance=R("provenance.json"),
    log:
        R("logs/report.log"),
    conda:
        CONDA_ENV
    params:
        out=lambda wc, output: str(Path(output.curves).parent),
        run=lambda wc, output: str(Path(output.provenance).parent),
        code=code("report"),
    shell:
        "morphfuse report --run-dir {params.run} --config {input.config} --out {params.out} > {log} 2>&1"


rule export:
    input:
        lfdl=R("models", "lfdl", MODEL_FILE),  # export.checkpoint: the last model or the best on val
        mitl=R("models", "mitl", MODEL_FILE),
        tables=rules.tables.output.table_md,
        manifest=R("manifest/manifest.parquet"),
        config=rules.effective_config.output,
        thresholds=THRESHOLDS,
    output:
        # the bundle's bundle.json, not the folder: Snakemake writes a timestamp file into a directory() output,
        # and the bundle must hold only its own files (export writes the whole folder and renames it into place)
        bundle_json=R("bundle/bundle.json"),
    log:
        R("logs/export.log"),
    conda:
        CONDA_ENV
    params:
        bundle=lambda wc, output: str(Path(output.bundle_json).parent),
        tables=lambda wc, input: str(Path(input.tables).parent),
        thresholds=thresholds_arg(),
        code=code("export"),
    shell:
        "morphfuse export --lfdl {input.lfdl} --mitl {input.mitl} --config {input.config} --out {params.bundle}"
        " --tables {params.tables} --manifest {input.manifest} {params.thresholds} > {log} 2>&1"
