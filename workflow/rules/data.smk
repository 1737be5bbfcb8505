# sources -> index + identity-disjoint split -> forge (method x shard of reals) -> sharded manifest


checkpoint index:
    output:
        idx=R("index/index.parquet"),
        ledger=R("ledger/index/index.csv"),
    log:
        R("logs/index.log"),
    conda:
        CONDA_ENV
    params:
        config=config_slice("sources", "split", "images"),
        folders=folders_fingerprint([resolve_path(s["root"]) for s in config["sources"]]),
        code=code("index"),
    shell:
        "morphfuse index --config {params.config:q} --out {output.idx} --ledger {output.ledger} > {log} 2>&1"


rule forge:
    input:
        idx=R("index/index.parquet"),
        models=forge_files,
    output:
        rows=R("forge/{method}/{fshard}/rows.parquet"),
        ledger=R("ledger/forge/{method}_{fshard}.csv"),
    log:
        R("logs/forge/{method}_{fshard}.log"),
    conda:
        CONDA_ENV
    params:
        out=lambda wc: R("forge", wc.method, wc.fshard),
        shard=lambda wc: int(wc.fshard),
        config=config_slice("seed", "shard_size", "forge.per_real", "forge.min_face_size", "forge.{method}", "faces"),
        code=code("forge"),
    shell:
        "morphfuse forge {wildcards.method} --index {input.idx} --shard {params.shard} --out {params.out}"
        " --config {params.config:q} --ledger {output.ledger} --no-progress > {log} 2>&1"


checkpoint manifest:
    input:
        idx=R("index/index.parquet"),
        forged=forged_rows,
    output:
        manifest=R("manifest/manifest.parquet"),
        shards=R("manifest/shards.csv"),
        shard_dir=directory(R("manifest/shards")),
    log:
        R("logs/manifest.log"),
    conda:
        CONDA_ENV
    params:
        shard_size=SHARD_SIZE,
        out_dir=lambda wc, output: str(Path(output.manifest).parent),
        code=code("manifest"),
    shell:
        "morphfuse manifest --index {input.idx} --forged {input.forged} --shard-size {params.shard_size}"
        " --out-dir {params.out_dir} > {log} 2>&1"
