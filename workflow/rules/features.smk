# crops -> LFDL inputs (face crops + SRM);  manifest shard -> MITL inputs (whole image + DCT bands)


rule features_lfdl:
    input:
        shard=R("manifest/shards/{shard}.parquet"),
        crops=rules.crops.output.crops,
    output:
        npz=R("features/lfdl/{shard}.npz"),
        ledger=R("ledger/features_lfdl/{shard}.csv"),
    log:
        R("logs/features_lfdl/{shard}.log"),
    conda:
        CONDA_ENV
    params:
        size=config["lfdl"]["size"],
        mode=config["features"]["mode"],
        code=code("features"),
    shell:
        "morphfuse features --manifest {input.shard} --crops {input.crops} --out-lfdl {output.npz}"
        " --lfdl-size {params.size} --mode {params.mode} --ledger {output.ledger} > {log} 2>&1"


rule features_mitl:
    input:
        shard=R("manifest/shards/{shard}.parquet"),
    output:
        npz=R("features/mitl/{shard}.npz"),
        ledger=R("ledger/features_mitl/{shard}.csv"),
    log:
        R("logs/features_mitl/{shard}.log"),
    conda:
        CONDA_ENV
    params:
        size=config["mitl"]["size"],
        mode=config["features"]["mode"],
        low_band=config["mitl"]["low_band"],
        code=code("features"),
    shell:
        "morphfuse features --manifest {input.shard} --out-mitl {output.npz} --mitl-size {params.size}"
        " --mode {params.mode} --low-band {params.low_band} --ledger {output.ledger} > {log} 2>&1"
