# features -> train_lfdl / train_mitl [GPU] -> predict per evaluated shard (scores + full-size probability masks)
from morphfuse.models import NOT_READ_BY_TRAINING
from morphfuse.training.resources import train_mem_mb_from_config


def _launcher(model):
    """One process on a CPU or one GPU; torchrun with one process per GPU otherwise (DDP inside one job)."""
    gpus = int(config[model]["gpus"])
    if gpus > 1:
        return (
            f"{sys.executable} -m torch.distributed.run --standalone"
            f" --nproc_per_node=${{SLURM_GPUS_ON_NODE:-{gpus}}} -m morphfuse"
        )
    return "morphfuse"  # the shell function (common.smk)


def _training_keys(model):
    """What training reads: the model's block (network options, recipe, gpus) and the top-level seed."""
    return ["seed"] + [f"{model}.{k}" for k in sorted(config[model]) if k not in NOT_READ_BY_TRAINING]


def _weights(model):
    """Pretrained backbone files (local paths or hub ids resolved in the local cache): rule inputs, so replacing
    one retrains."""
    return weight_paths(config, model)


# The trained model that predict, the robustness sweep and export use (export.checkpoint): the last or the best on val.
MODEL_FILE = {"last": "model.pt", "best": "model_best.pt"}[config["export"]["checkpoint"]]


for _model in ("lfdl", "mitl"):

    rule:
        name:
            f"train_{_model}"
        input:
            features=lambda wc, m=_model: [R("features", m, f"{s}.npz") for s in train_shards()],
            weights=_weights(_model),
        output:
            model=R("models", _model, "model.pt"),
            model_best=R("models", _model, "model_best.pt"),
            metrics=R("models", _model, "metrics.csv"),
        log:
            R("logs", f"train_{_model}.log"),
        conda:
            CONDA_ENV
        threads: config[_model]["threads"]
        resources:
            gpu=config[_model]["gpus"],
            # from batch size, workers and processes, not from the data (training streams it)
            mem_mb=train_mem_mb_from_config(config, _model),
        params:
            model=_model,
            out=lambda wc, output: str(Path(output.model).parent),
            launcher=_launcher(_model),
            config=config_slice(*_training_keys(_model)),
            code=code("train"),
        shell:
            "OMP_NUM_THREADS={threads} {params.launcher} train {params.model} --config {params.config:q}"
            " --features {input.features} --out {params.out} --resume auto > {log} 2>&1"


# Parameters of the predict rules that are not paths (shared with the robustness sweep's copies of these rules).
PREDICT_PARAMS = {
    m: dict(
        model=m,
        code=code("predict"),
        score=(
            f" --score-rule {config['mitl']['score']['rule']} --score-percent {config['mitl']['score']['percent']}"
            if m == "mitl"
            else ""
        ),
    )
    for m in ("lfdl", "mitl")
}

if config["predictions"]["source"] == "models":
    for _model in ("lfdl", "mitl"):

        rule:
            name:
                f"predict_{_model}"
            input:
                model=R("models", _model, MODEL_FILE),
                features=R("features", _model, "{shard}.npz"),
                shard=R("manifest/shards/{shard}.parquet"),
            output:
                scores=R("predict", _model, "{shard}", "scores.csv"),
                masks=directory(R("predict", _model, "{shard}", "masks")),
            log:
                R("logs", f"predict_{_model}", "{shard}.log"),
            conda:
                CONDA_ENV
            threads: 1
            resources:
                gpu=1,
            params:
                **PREDICT_PARAMS[_model],
                out=lambda wc, m=_model: R("predict", m, wc.shard),
            shell:
                "OMP_NUM_THREADS={threads} morphfuse predict {params.model} --model {input.model} --features {input.features}"
                " --manifest {input.shard} --out {params.out}{params.score} --no-progress > {log} 2>&1"

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
            log:
                R("logs", f"predictions_from_files_{_model}", "{shard}.log"),
            conda:
                CONDA_ENV
            params:
                model=_model,
                masks=config["predictions"]["files"][f"{_model}_masks"],
                scores=config["predictions"]["files"][f"{_model}_scores"],
                out=lambda wc, m=_model: R("predict", m, wc.shard),
                code=code("predictions-from-files"),
            shell:
                "morphfuse predictions-from-files --manifest {input.shard} --masks {params.masks}"
                " --scores {params.scores} --out {params.out} > {log} 2>&1"
