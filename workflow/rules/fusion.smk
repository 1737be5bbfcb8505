# predictions -> fuse (per variant x evaluated shard): MDMF and the ablation variants of Table 2


rule fit_thresholds:
    input:
        shards=lambda wc: [R("manifest/shards", f"{s}.parquet") for s in val_shards()],
        scores=lambda wc: [R("predict/lfdl", s, "scores.csv") for s in val_shards()],
        lfdl=lambda wc: [R("predict/lfdl", s, "masks") for s in val_shards()],
        mitl=lambda wc: [R("predict/mitl", s, "masks") for s in val_shards()],
    output:
        R("thresholds/thresholds.json"),
    log:
        R("logs/fit_thresholds.log"),
    conda:
        CONDA_ENV
    params:
        lfdl=lambda wc: [R("predict/lfdl", s) for s in val_shards()],
        mitl=lambda wc: [R("predict/mitl", s) for s in val_shards()],
        variant="mdmf" if "mdmf" in config["fusion"]["variants"] else config["fusion"]["variants"][-1],
        kernel=config["fusion"]["kernel"],
        averaging=config["evaluate"]["averaging"],
        code=code("thresholds"),
    shell:
        "morphfuse thresholds --manifest {input.shards} --lfdl {params.lfdl} --mitl {params.mitl}"
        " --variant {params.variant} --kernel {params.kernel} --averaging {params.averaging} --out {output}"
        " > {log} 2>&1"


rule fuse:
    input:
        lfdl=R("predict/lfdl/{shard}/masks"),
        mitl=R("predict/mitl/{shard}/masks"),
        thresholds=THRESHOLDS,
    output:
        masks=directory(R("fuse/{variant}/{shard}/masks")),
        ledger=R("ledger/fuse/{variant}_{shard}.csv"),
    log:
        R("logs/fuse/{variant}_{shard}.log"),
    conda:
        CONDA_ENV
    params:
        kernel=config["fusion"]["kernel"],
        threshold=thresholds_arg(f"--threshold {config['fusion']['threshold']}"),
        code=code("fuse"),
    shell:
        "morphfuse fuse --lfdl-masks {input.lfdl} --mitl-masks {input.mitl} --out {output.masks}"
        " --variant {wildcards.variant} --kernel {params.kernel} {params.threshold}"
        " --ledger {output.ledger} --allow-errors > {log} 2>&1"
