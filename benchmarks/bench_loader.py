"""Input pipeline throughput: training images per CPU-second (per core), from disk, through morphfuse's loader
(streamed feature shard → dataset → augmentation → collate) against a plain read-flip-resize baseline over the
same rows, in the same process, rounds interleaved.

One process, one thread (cv2 and torch), ``num_workers=0`` so every cost is in the measured process; CPU time
(``time.process_time``) per image, so other load on a shared machine costs less accuracy than wall time would.
"From disk": before every pass the shard's pages are dropped from the page cache (``posix_fadvise DONTNEED``),
so the rows are read from the disk (``--warm`` keeps them cached: the page-cache case).

- baseline: read a row (rgb + mask, the same store), horizontal flip, crop a random 80–100 % square and resize it
  back to S×S (cv2 INTER_LINEAR image, INTER_NEAREST mask), to tensors, collate;
- morphfuse: :class:`morphfuse.training.data.FeatureDataset` with the model's training augmentation, collated
  (uint8 wire format); ``+finish`` adds :func:`finish_batch` on the CPU (on CUDA it runs on the device).

    nice -n 10 .venv/bin/python benchmarks/bench_loader.py --work /tmp/me/loader
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_shards import write_shards  # noqa: E402

from morphfuse.training.data import FeatureDataset, SplitRows, finish_batch, open_shards  # noqa: E402


class Baseline(Dataset):
    def __init__(self, rows: SplitRows, size: int, seed: int = 0):
        self.rows, self.size, self.seed = rows, size, seed

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        epoch, i, _ = key
        rng = np.random.default_rng([self.seed, epoch, i])
        rgb, mask = self.rows.read(i, "rgb"), self.rows.read(i, "mask")
        rgb, mask = cv2.flip(rgb, 1), cv2.flip(mask, 1)
        s = self.size
        side = int(s * rng.uniform(0.8, 1.0))
        y, x = rng.integers(0, s - side + 1, 2)
        rgb = cv2.resize(rgb[y:y + side, x:x + side], (s, s), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask[y:y + side, x:x + side], (s, s), interpolation=cv2.INTER_NEAREST)
        return {"rgb": torch.from_numpy(rgb).permute(2, 0, 1), "mask": torch.from_numpy(mask)[None],
                "label": torch.tensor(float(self.rows.label[i]))}


def drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def one_pass(ds, keys, batch: int, finish: bool) -> float:
    loader = DataLoader(ds, batch_sampler=[keys[j:j + batch] for j in range(0, len(keys), batch)], num_workers=0,
                        collate_fn=default_collate)
    t = time.process_time()
    n = 0
    for b in loader:
        if finish:
            finish_batch(b)
        n += b["rgb"].shape[0]
    return n / (time.process_time() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=0, help="rows per shard (default: 1024 at 299, 512 at 512)")
    ap.add_argument("--images", type=int, default=384, help="images per pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warm", action="store_true", help="keep the shard in the page cache (no drop)")
    ap.add_argument("--only", choices=["lfdl", "mitl"], default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--compare-augment", type=Path, default=None, metavar="AUGMENT_PY",
                    help="also time the dataset with the augment.py of another checkout (e.g. before a change)")
    args = ap.parse_args()
    other = None
    if args.compare_augment:
        import importlib.util

        spec = importlib.util.spec_from_file_location("other_augment", args.compare_augment)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    cases = [("lfdl", 299), ("mitl", 512)]
    print(f"{'model':6} {'size':>4} {'path':28} {'img/s per core (median of rounds)':>34}  all rounds")
    for kind, size in cases:
        if args.only and kind != args.only:
            continue
        rows_per = args.rows or (1024 if size < 400 else 512)
        paths = write_shards(args.work / f"{kind}{size}", kind, size, rows_per, 1)
        pool = open_shards(paths, kind, size)
        rows = SplitRows(pool, kind, "train", precomputed=False)
        ours = FeatureDataset(rows, kind, augment=True, seed=0)
        base = Baseline(rows, size)
        res: dict[str, list[float]] = {"baseline": [], "morphfuse": [], "morphfuse+finish": []}
        cases_r = [("baseline", base, False), ("morphfuse", ours, False), ("morphfuse+finish", ours, True)]
        if other is not None:
            import morphfuse.training.data as data_mod

            class OtherAug(FeatureDataset):
                def __getitem__(self, key, _fn=other.augment):
                    saved = data_mod.augment_sample
                    data_mod.augment_sample = _fn
                    try:
                        return super().__getitem__(key)
                    finally:
                        data_mod.augment_sample = saved

            res["morphfuse, other augment.py"] = []
            cases_r.append(("morphfuse, other augment.py", OtherAug(rows, kind, augment=True, seed=0), False))
        for r in range(args.rounds):
            keys = [(r, int(i), 0) for i in np.random.default_rng(r).permutation(len(rows))[:args.images]]
            for name, ds, fin in cases_r:
                if not args.warm:
                    drop_cache(paths)
                res[name].append(one_pass(ds, keys, args.batch, fin))
        for name, v in res.items():
            print(f"{kind:6} {size:4d} {name:28} {statistics.median(v):34.1f}  {', '.join(f'{x:.0f}' for x in v)}")
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"{kind:6} {size:4d} ratio morphfuse / baseline: {med['morphfuse'] / med['baseline']:.2f}")
        if not args.keep:
            shutil.rmtree(args.work / f"{kind}{size}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
