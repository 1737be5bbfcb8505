# manifest shard -> faces (boxes, scores, landmarks) -> adaptive crops (boxes kept for pasting back)


rule faces:
    input:
        shard=R("manifest/shards/{shard}.parquet"),
        weights=local_files(config["faces"]["face_alignment"]["torch_home"]
                            if config["faces"]["backend"] == "face_alignment" else None),
    output:
        faces=R("faces/{shard}.parquet"),
        ledger=R("ledger/faces/{shard}.csv"),
    params:
        config=config_slice("faces"),
        code=code("faces"),
    threads: 1
    conda:
        CONDA_ENV
    log:
        R("logs/faces/{shard}.log"),
    shell:
        "{MF} faces --manifest {input.shard} --out {output.faces} --config {params.config:q}"
        " --ledger {output.ledger} --threads {threads} --no-progress > {log} 2>&1"


rule crops:
    input:
        shard=R("manifest/shards/{shard}.parquet"),
        faces=rules.faces.output.faces,
        faces_ledger=rules.faces.output.ledger,
    output:
        crops=R("crops/{shard}.parquet"),
        ledger=R("ledger/crops/{shard}.csv"),
    params:
        crops=config["crops"],
        code=code("crops"),
    conda:
        CONDA_ENV
    log:
        R("logs/crops/{shard}.log"),
    shell:
        "{MF} crops --manifest {input.shard} --faces {input.faces} --out {output.crops}"
        " --margin {params.crops[margin]} --max-face-area-fraction {params.crops[max_face_area_fraction]}"
        " --reference-region {params.crops[reference_region]} --reference-pad {params.crops[reference_pad]}"
        " --faces-ledger {input.faces_ledger} --ledger {output.ledger} > {log} 2>&1"
