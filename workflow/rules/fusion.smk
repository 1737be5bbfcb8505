# predictions -> fuse (per variant x evaluated shard): MDMF and the ablation variants of Table 2


rule fuse:
    input:
        lfdl=R("predict/lfdl/{shard}/masks"),
        mitl=R("predict/mitl/{shard}/masks"),
    output:
        masks=directory(R("fuse/{variant}/{shard}/masks")),
        ledger=R("ledger/fuse/{variant}_{shard}.csv"),
    params:
        kernel=config["fusion"]["kernel"],
        threshold=config["fusion"]["threshold"],
        code=code("fuse"),
    conda:
        CONDA_ENV
    log:
        R("logs/fuse/{variant}_{shard}.log"),
    shell:
        "{MF} fuse --lfdl-masks {input.lfdl} --mitl-masks {input.mitl} --out {output.masks}"
        " --variant {wildcards.variant} --kernel {params.kernel} --threshold {params.threshold}"
        " --ledger {output.ledger} --allow-errors > {log} 2>&1"
