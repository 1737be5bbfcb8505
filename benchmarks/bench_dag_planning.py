"""How long `snakemake -n` takes to plan the DAG over a large manifest (jobs grow with shards, not images).

Builds a synthetic results tree whose checkpoint outputs (index, manifest, shard list and shard files) describe
N images, then times a dry run of the whole workflow against it:

    .venv/bin/python benchmarks/bench_dag_planning.py --images 1500000 --shard-size 4096 [--sweep default|off]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def make_tree(root: Path, n_images: int, shard_size: int, sweep: str = "default") -> Path:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    # the overlay is merged into config.yaml: the sweep is replaced by the schema's full one, or switched off
    cfg["evaluate"]["robustness"] = ({"jpeg": [90, 70, 50], "downscale": [0.75, 0.5], "blur": [1, 2], "noise": [3, 7]}
                                     if sweep == "default" else None)
    cfg["results_dir"] = str(root / "results")
    cfg["run_name"] = "big"
    cfg["shard_size"] = shard_size
    cfg["forge"]["methods"] = []  # an imported dataset (DDL-I): no built-in forgeries
    cfg["sources"] = [{"name": "ddl", "kind": "ddl", "root": str(root)}]
    run = root / "results" / "big"
    (run / "index").mkdir(parents=True)
    (run / "manifest" / "shards").mkdir(parents=True)
    (run / "ledger" / "index").mkdir(parents=True)
    rng = np.random.default_rng(0)
    split = rng.choice(["train", "val", "test"], size=n_images, p=[0.7, 0.1, 0.2])
    idx = pd.DataFrame({"image_id": [f"img{i:07d}" for i in range(n_images)], "split": split,
                        "label": rng.integers(0, 2, n_images)})
    idx.to_parquet(run / "index" / "index.parquet")
    (run / "ledger" / "index" / "index.csv").write_text("stage,image_id,path,reason\n")
    idx = idx.sort_values(["split", "image_id"])
    rank = idx.groupby("split").cumcount().to_numpy()
    idx["shard"] = [f"{s}_{r // shard_size:05d}" for s, r in zip(idx["split"], rank)]
    idx.to_parquet(run / "manifest" / "manifest.parquet")
    shards = idx.groupby("shard").agg(split=("split", "first"), n=("image_id", "size")).reset_index()
    shards.to_csv(run / "manifest" / "shards.csv", index=False)
    for s in shards["shard"]:
        (run / "manifest" / "shards" / f"{s}.parquet").touch()
    p = root / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1_500_000)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--sweep", choices=["default", "off"], default="default",
                    help="the robustness sweep: the schema's default (8 levels) or none")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cfg = make_tree(Path(d), a.images, a.shard_size, a.sweep)
        import resource

        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--cores", "1",
                            "--configfile", str(cfg), "--snakefile", str(REPO / "Snakefile"),
                            "--directory", str(REPO)], capture_output=True, text=True)
        dt = time.perf_counter() - t
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
        if r.returncode:
            sys.exit(r.stdout[-3000:] + r.stderr[-3000:])
        totals = [int(line.split()[-1]) for line in r.stdout.splitlines()
                  if len(line.split()) == 2 and line.split()[0] == "total" and line.split()[-1].isdigit()]
        jobs = totals[0] if totals else -1
        print(f"images={a.images} shard_size={a.shard_size} shards={-(-a.images // a.shard_size)}+ "
              f"sweep={a.sweep} jobs={jobs} dry_run_s={dt:.1f} cpu_s={cpu:.1f}")
        print(r.stdout[-1500:])


if __name__ == "__main__":
    main()
