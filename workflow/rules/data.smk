# sources -> index + identity-disjoint split -> forge (method x shard of reals) -> sharded manifest


checkpoint index:
    output:
        idx=R("index/index.parquet"),
        ledger=R("ledger/index/index.csv"),
    params:
        sources=config["sources"],
        split=config["split"],
        folders=folders_fingerprint([resolve_path(s["root"]) for s in config["sources"]]),
        code=code_hash("sources.py", "split.py", "stages/index.py", "imageio.py", "forge/importer.py"),
    conda:
        CONDA_ENV
    log:
        R("logs/index.log"),
    shell:
        "{MF} index --config {CONFIG} --out {output.idx} --ledger {output.ledger} > {log} 2>&1"


rule forge:
    input:
        idx=R("index/index.parquet"),
    output:
        rows=R("forge/{method}/{fshard}/rows.parquet"),
        ledger=R("ledger/forge/{method}_{fshard}.csv"),
    params:
        out=lambda wc: R("forge", wc.method, wc.fshard),
        shard=lambda wc: int(wc.fshard),
        options=lambda wc: config["forge"].get(wc.method, {}),
        per_real=config["forge"]["per_real"],
        # The authors' minimum face size does not apply to random combination (FORGERIES.md).
        min_face=lambda wc: 0 if wc.method in ("random_combination", "paste_random")
        else config["forge"].get("min_face_size", 0),
        seed=config["seed"],
        code=code_hash("forge", "faces/backends.py", "faces/landmarks.py", "imageio.py"),
    conda:
        CONDA_ENV
    log:
        R("logs/forge/{method}_{fshard}.log"),
    shell:
        "{MF} forge {wildcards.method} --index {input.idx} --shard {params.shard} --shard-size {SHARD_SIZE}"
        " --out {params.out} --seed {params.seed} --per-real {params.per_real} --min-face-size {params.min_face}"
        " --config {CONFIG} --ledger {output.ledger} --no-progress > {log} 2>&1"


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
        code=code_hash("stages/manifest.py"),
    conda:
        CONDA_ENV
    log:
        R("logs/manifest.log"),
    shell:
        "{MF} manifest --index {input.idx} --forged {input.forged} --shard-size {params.shard_size}"
        " --out-dir {params.out_dir} > {log} 2>&1"
