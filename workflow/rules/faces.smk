# manifest shard -> faces (boxes, scores, landmarks) -> adaptive crops (boxes kept for pasting back)


rule faces:
    input:
        shard=R("manifest/shards/{shard}.parquet"),
    output:
        faces=R("faces/{shard}.parquet"),
        ledger=R("ledger/faces/{shard}.csv"),
    params:
        backend=config["faces"]["backend"],
        upsample=config["faces"].get("upsample", 1),
        min_score=config["faces"].get("min_score", 0.0),
        torch_home=(config["faces"].get("face_alignment") or {}).get("torch_home") or "",
        gray=" --gray" if config["faces"].get("gray") else "",
        code=code_hash("faces/backends.py", "faces/cli.py", "faces/landmarks.py", "imageio.py"),
    threads: 1
    conda:
        CONDA_ENV
    log:
        R("logs/faces/{shard}.log"),
    shell:
        "{MF} faces --manifest {input.shard} --out {output.faces} --backend {params.backend}"
        " --upsample {params.upsample} --min-score {params.min_score} --ledger {output.ledger} --threads {threads} --no-progress"
        "{params.gray}"
        " $( [ -n '{params.torch_home}' ] && echo --torch-home '{params.torch_home}' ) > {log} 2>&1"


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
        code=code_hash("faces/crops.py", "faces/cli.py", "faces/landmarks.py"),
    conda:
        CONDA_ENV
    log:
        R("logs/crops/{shard}.log"),
    shell:
        "{MF} crops --manifest {input.shard} --faces {input.faces} --out {output.crops}"
        " --rule {params.crops[rule]} --expand {params.crops[expand]}"
        " --margin {params.crops[margin]} --max-face-area-fraction {params.crops[max_face_area_fraction]}"
        " --reference-region {params.crops[reference_region]} --reference-pad {params.crops[reference_pad]}"
        " --faces-ledger {input.faces_ledger} --ledger {output.ledger} > {log} 2>&1"
