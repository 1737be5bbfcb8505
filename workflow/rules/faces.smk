# manifest shard -> faces (boxes, scores, landmarks) -> adaptive crops (boxes kept for pasting back)


rule faces:
    input:
        shard=R("manifest/shards/{shard}.parquet"),
        weights=local_files(face_weight_dir(config["faces"])),
    output:
        faces=R("faces/{shard}.parquet"),
        ledger=R("ledger/faces/{shard}.csv"),
    log:
        R("logs/faces/{shard}.log"),
    conda:
        CONDA_ENV
    threads: 1
    params:
        config=config_slice("faces"),
        code=code("faces"),
    shell:
        "morphfuse faces --manifest {input.shard} --out {output.faces} --config {params.config:q}"
        " --ledger {output.ledger} --threads {threads} --no-progress > {log} 2>&1"


rule crops:
    input:
        shard=R("manifest/shards/{shard}.parquet"),
        faces=rules.faces.output.faces,
        faces_ledger=rules.faces.output.ledger,
    output:
        crops=R("crops/{shard}.parquet"),
        ledger=R("ledger/crops/{shard}.csv"),
    log:
        R("logs/crops/{shard}.log"),
    conda:
        CONDA_ENV
    params:
        config=config_slice("crops"),
        code=code("crops"),
    shell:
        "morphfuse crops --manifest {input.shard} --faces {input.faces} --out {output.crops} --config {params.config:q}"
        " --faces-ledger {input.faces_ledger} --ledger {output.ledger} > {log} 2>&1"
