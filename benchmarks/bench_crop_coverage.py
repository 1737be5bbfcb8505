"""How much of each forgery's manipulated area the LFDL face crops hold, under both crop rules.

The demo's photos (config.yaml's sources: London Set neutral + smiling, lisa, zoom) are detected once (dlib,
the demo's settings), forged with the demo's methods (SBI and random combination, seed 0, one per photo; donors of
another identity among the same photos), and cropped with the release's rule (5-landmark box x 1.5, 0.7 test on the
expanded box) and with the 1.3x detector-box rule. Reported per rule: the fraction of manipulated pixels outside
every crop of their image (pooled over all fakes, and the worst fake), how many images became a whole-image crop,
and the mean area of a crop as a fraction of its image.

    .venv/bin/python benchmarks/bench_crop_coverage.py [--limit N] [--rc-options '{forehead: false}']
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("neutral_front", "smiling_front", "lisa", "zoom")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "faces" / "london_512"))
    ap.add_argument("--limit", type=int, default=0, help="first N photos only (0: all)")
    ap.add_argument("--rc-options", default="{}",
                    help="random_combination options as YAML, e.g. '{forehead: false, target_box: landmarks}' for "
                         "the geometry before the release's was adopted")
    args = ap.parse_args()

    from morphfuse.faces.backends import get_backend
    from morphfuse.faces.crops import crop_boxes
    from morphfuse.forge.common import DonorPool, check_faces, rng_for
    from morphfuse.forge.random_combination import make_random_combination
    from morphfuse.forge.sbi import make_sbi
    from morphfuse.imageio import read_image

    root = Path(args.root)
    paths = sorted(p for f in FOLDERS for p in (root / f).glob("*") if p.suffix.lower() in (".jpg", ".png"))
    if args.limit:
        paths = paths[: args.limit]
    rows = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        m = re.search(r"(\d{3})_\d{2}\.", rel)
        g = m.group(1) if m else rel.split("/")[0]
        rows.append({"image_id": rel, "root": str(root), "path": rel, "label": 0, "group": g, "split": "all"})
    index = pd.DataFrame(rows)
    backend = get_backend("dlib", upsample=0)
    t0 = time.perf_counter()
    cache: dict[str, tuple] = {}

    def load(row):
        key = row["image_id"]
        if key not in cache:
            rgb = read_image(Path(row["root"]) / row["path"])
            cache[key] = (rgb, backend.detect(rgb))
        return cache[key]

    pool = DonorPool(index, load)
    import yaml

    gens = {"sbi": make_sbi({"forehead": True}),
            "random_combination": make_random_combination(yaml.safe_load(args.rc_options) or {})}
    stats = {rule: {"outside": 0, "total": 0, "worst": 0.0, "whole": 0, "area": []} for rule in ("release", "margin")}
    n_fakes = 0
    for _, target in index.iterrows():
        rgb, faces = load(target)
        if check_faces(faces, 0, need_landmarks=True):
            continue
        h, w = rgb.shape[:2]
        crops = {rule: crop_boxes(faces, w, h, 1.3, 0.7, rule=rule) for rule in stats}
        for rule, cs in crops.items():
            stats[rule]["whole"] += any(c.face_idx == -1 for c in cs)
            stats[rule]["area"] += [(c.x1 - c.x0) * (c.y1 - c.y0) / (w * h) for c in cs]
        for method, gen in gens.items():
            res = gen(target, rgb, faces, rng_for(0, method, target["image_id"]), {}, donors=pool)
            if not hasattr(res, "mask"):
                continue
            n_fakes += 1
            for rule, cs in crops.items():
                inside = np.zeros((h, w), bool)
                for c in cs:
                    inside[c.y0:c.y1, c.x0:c.x1] = True
                out = int((res.mask & ~inside).sum())
                tot = int(res.mask.sum())
                s = stats[rule]
                s["outside"] += out
                s["total"] += tot
                s["worst"] = max(s["worst"], out / tot)
    print(f"{len(index)} photos, {n_fakes} fakes (sbi + random_combination), {time.perf_counter() - t0:.0f} s")
    print("| crop rule | manipulated pixels outside the crops (pooled) | worst fake | whole-image crops | "
          "mean crop area / image |")
    print("|---|---|---|---|---|")
    for rule, s in stats.items():
        print(f"| {rule} | {100 * s['outside'] / max(1, s['total']):.3f} % | {100 * s['worst']:.1f} % | "
              f"{s['whole']} of {len(index)} | {100 * np.mean(s['area']):.1f} % |")


if __name__ == "__main__":
    main()
