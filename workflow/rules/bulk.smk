# bulk: a model bundle applied to a folder of (millions of) images, e.g. a trust-and-safety queue.
#   snakemake bulk --config bulk='{input: /data/queue, models: results/paper/bundle}' [--workflow-profile profiles/slurm]
# One `morphfuse detect` job per shard of the folder's file list (bulk.shard_size images), so a rerun redoes only
# the shards that did not finish; per image the same outputs as `morphfuse detect FOLDER` (same names), in
# bulk/shards/<k>/ (masks/, prob/, overlays/, scores.csv, ledger.csv), merged scores and ledger in bulk/.
BULK = config["bulk"]


wildcard_constraints:
    bshard=r"\d{5}",


if BULK["input"]:
    BULK_ROOT = str(resolve_path(BULK["input"]))
    BULK_MODELS = str(resolve_path(BULK["models"])) if BULK["models"] else R("bundle/bundle.json")

    checkpoint bulk_list:
        output:
            lists=directory(R("bulk/lists")),
        log:
            R("logs/bulk_list.log"),
        conda:
            CONDA_ENV
        params:
            root=BULK_ROOT,
            shard_size=BULK["shard_size"],
            code=code("bulk"),
        shell:
            "morphfuse bulk list --root {params.root} --shard-size {params.shard_size} --out {output.lists} > {log} 2>&1"

    rule bulk_detect:
        input:
            lst=bulk_list_file,
            models=BULK_MODELS,
        output:
            out=directory(R("bulk/shards/{bshard}")),
        log:
            R("logs/bulk_detect/{bshard}.log"),
        conda:
            CONDA_ENV
        threads: 1
        resources:
            gpu=1,
        params:
            root=BULK_ROOT,
            device=BULK["device"],
            batch_size=BULK["batch_size"],
            code=code("detect"),
        shell:
            # exit 1 = some inputs were unusable (listed in the shard's ledger.csv): the shard is still done
            "OMP_NUM_THREADS={threads} morphfuse detect --input-list {input.lst} --input-root {params.root}"
            " --models {input.models} --out {output.out} --device {params.device} --batch-size {params.batch_size}"
            " --no-progress > {log} 2>&1 || [ $? -eq 1 ]"

    rule bulk_merge:
        input:
            shards=bulk_shard_dirs,
        output:
            scores=R("bulk/scores.csv"),
            ledger=R("bulk/ledger.csv"),
        log:
            R("logs/bulk_merge.log"),
        conda:
            CONDA_ENV
        params:
            out=R("bulk"),
            code=code("bulk"),
        shell:
            "morphfuse bulk merge --shards {input.shards} --out {params.out} > {log} 2>&1"

    rule bulk:
        input:
            R("bulk/scores.csv"),
