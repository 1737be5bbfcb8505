# features -> train_lfdl / train_mitl [GPU] -> predict per evaluated shard (scores + full-size probability masks)


def _launcher(model):
    """One process on a CPU or one GPU; torchrun with one process per GPU otherwise (DDP inside one job)."""
    gpus = int(config[model].get("gpus", 1))
    if gpus > 1:
        return (f"{sys.executable} -m torch.distributed.run --standalone"
                f" --nproc_per_node=${{SLURM_GPUS_ON_NODE:-{gpus}}} -m morphfuse")
    return MF


def _model_params(model):
    """Everything of the model's config block that changes the trained weights (not the paper block)."""
    return {k: v for k, v in config[model].items() if k not in ("paper", "gpus", "threads")}


from morphfuse.training.resources import train_mem_mb_from_config

MODEL_CODE = {
    "lfdl": code_hash("models/__init__.py", "models/lfdl.py", "srm.py", "training", "features.py"),
    "mitl": code_hash("models/__init__.py", "models/mitl.py", "dct.py", "training", "features.py"),
}

for _model in ("lfdl", "mitl"):

    rule:
        name:
            f"train_{_model}"
        input:
            features=lambda wc, m=_model: [R("features", m, f"{s}.npz") for s in train_shards()],
        output:
            model=R("models", _model, "model.pt"),
            metrics=R("models", _model, "metrics.csv"),
        params:
            model=_model,
            out=R("models", _model),
            launcher=_launcher(_model),
            options=_model_params(_model),
            seed=config["seed"],
            code=MODEL_CODE[_model],
        threads: int(config[_model].get("threads", 1))
        resources:
            gpu=int(config[_model].get("gpus", 1)),
            # from batch size, workers and processes, not from the data (training streams it)
            mem_mb=train_mem_mb_from_config(config, _model),
        conda:
            CONDA_ENV
        log:
            R("logs", f"train_{_model}.log"),
        shell:
            "OMP_NUM_THREADS={threads} {params.launcher} train {params.model} --config {CONFIG} --features {input.features}"
            " --out {params.out} --resume auto > {log} 2>&1"


if config["predictions"]["source"] == "models":
    for _model in ("lfdl", "mitl"):

        rule:
            name:
                f"predict_{_model}"
            input:
                model=R("models", _model, "model.pt"),
                features=R("features", _model, "{shard}.npz"),
                shard=R("manifest/shards/{shard}.parquet"),
            output:
                scores=R("predict", _model, "{shard}", "scores.csv"),
                masks=directory(R("predict", _model, "{shard}", "masks")),
            params:
                model=_model,
                out=lambda wc, m=_model: R("predict", m, wc.shard),
                score=(config["mitl"].get("score") or {}) if _model == "mitl" else {},
                code=code_hash("predict.py", "models", "srm.py", "dct.py", "features.py"),
            threads: 1
            resources:
                gpu=1,
            conda:
                CONDA_ENV
            log:
                R("logs", f"predict_{_model}", "{shard}.log"),
            shell:
                "OMP_NUM_THREADS={threads} {MF} predict {params.model} --config {CONFIG} --model {input.model} --features {input.features}"
                " --manifest {input.shard} --out {params.out} --no-progress > {log} 2>&1"

else:
    for _model in ("lfdl", "mitl"):

        rule:
            name:
                f"predictions_from_files_{_model}"
            input:
                shard=R("manifest/shards/{shard}.parquet"),
            output:
                scores=R("predict", _model, "{shard}", "scores.csv"),
                masks=directory(R("predict", _model, "{shard}", "masks")),
            params:
                model=_model,
                masks=config["predictions"]["files"][f"{_model}_masks"],
                scores=config["predictions"]["files"][f"{_model}_scores"],
                out=lambda wc, m=_model: R("predict", m, wc.shard),
                code=code_hash("stages/predictions_from_files.py"),
            conda:
                CONDA_ENV
            log:
                R("logs", f"predictions_from_files_{_model}", "{shard}.log"),
            shell:
                "{MF} predictions-from-files --manifest {input.shard} --masks {params.masks}"
                " --scores {params.scores} --out {params.out} > {log} 2>&1"
