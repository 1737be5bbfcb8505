# sources -> index + identity-disjoint split -> forge (method x shard of reals) -> sharded manifest


checkpoint index:
    output:
        idx=R("index/index.parquet"),
        ledger=R("ledger/index/index.csv"),
    params:
        config=config_slice("sources", "split"),
        folders=folders_fingerprint([resolve_path(s["root"]) for s in config["sources"]]),
        code=code("index"),
    conda:
        CONDA_ENV
    log:
        R("logs/index.log"),
    shell:
        "{MF} index --config {params.config:q} --out {output.idx} --ledger {output.ledger} > {log} 2>&1"


def forge_files(wildcards):
    """Local models a generator loads (diffusion pipelines, face-alignment weights): replacing one reruns it."""
    block = config["forge"][wildcards.method]
    return local_files(block.get("model_dir"), config["faces"]["face_alignment"]["torch_home"]
                       if config["faces"]["backend"] == "face_alignment" else None)


rule forge:
    input:
        idx=R("index/index.parquet"),
        models=forge_files,
    output:
        rows=R("forge/{method}/{fshard}/rows.parquet"),
        ledger=R("ledger/forge/{method}_{fshard}.csv"),
    params:
        out=lambda wc: R("forge", wc.method, wc.fshard),
        shard=lambda wc: int(wc.fshard),
        config=config_slice("seed", "shard_size", "forge.per_real", "forge.min_face_size", "forge.{method}",
                            "faces"),
        code=code("forge"),
    conda:
        CONDA_ENV
    log:
        R("logs/forge/{method}_{fshard}.log"),
    shell:
        "{MF} forge {wildcards.method} --index {input.idx} --shard {params.shard} --out {params.out}"
        " --config {params.config:q} --ledger {output.ledger} --no-progress > {log} 2>&1"


def forged_rows(wildcards):
    return [R("forge", m, k, "rows.parquet") for m in config["forge"]["methods"] for k in forge_shard_ids()]


checkpoint manifest:
    input:
        idx=R("index/index.parquet"),
        forged=forged_rows,
    output:
        manifest=R("manifest/manifest.parquet"),
        shards=R("manifest/shards.csv"),
        shard_dir=directory(R("manifest/shards")),
    params:
        shard_size=SHARD_SIZE,
        out_dir=R("manifest"),
        code=code("manifest"),
    conda:
        CONDA_ENV
    log:
        R("logs/manifest.log"),
    shell:
        "{MF} manifest --index {input.idx} --forged {input.forged} --shard-size {params.shard_size}"
        " --out-dir {params.out_dir} > {log} 2>&1"
