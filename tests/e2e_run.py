"""The tiny end-to-end run shared by the tests (one per pytest session; the fixture is in conftest.py)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from conftest import LONDON_512, REPO


def tiny_config(work: Path) -> dict:
    """The real pipeline, small: 14 people (+ a folder of awkward files), 64 px models, one epoch."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["run_name"] = "tiny"
    cfg["results_dir"] = "results"  # relative to the work folder: a copy of it is a self-contained run
    cfg["shard_size"] = 8
    cfg["sources"] = [
        {"name": "london", "kind": "folder", "root": str(LONDON_512),
         "include": ["neutral_front/00[1-9]_03.jpg", "neutral_front/01[0-2]_03.jpg", "lisa/**", "zoom/**"],
         "identity": {"rule": "regex", "pattern": r"(\d{3})_\d{2}\.[A-Za-z]+$", "fallback": "folder"}},
        {"name": "odd", "kind": "folder", "root": str(work / "odd"), "identity": {"rule": "file"}},
        {"name": "ext", "kind": "generators", "root": str(work / "generated"), "identity": {"rule": "file"}},
    ]
    cfg["split"] = {"fractions": {"train": 0.5, "val": 0.2, "test": 0.3}, "seed": 1}
    cfg["forge"]["methods"] = ["sbi", "random_combination"]
    cfg["faces"]["upsample"] = 0
    cfg["lfdl"]["size"] = 64
    cfg["mitl"]["size"] = 64
    for m in ("lfdl", "mitl"):
        cfg[m]["train"].update({"epochs": 1, "batch_size": 4, "checkpoint_every": 1000})
    cfg["evaluate"].update({"bootstrap": 50, "panels": 2, "robustness": {"jpeg": [50]}})
    return cfg


ODD_CONVERTIBLE = ("cmyk", "grayscale", "exif_rotated", "png16", "rgba")  # used after conversion
ODD_UNUSABLE = ("corrupt_jpeg", "truncated_png", "zero_byte", "text_as_jpg", "bomb")  # recorded and skipped


def make_odd_inputs(folder: Path, bad_inputs: dict[str, Path]) -> None:
    """Issue 2's awkward inputs: a folder of odd real images, and an external generator's output with a good
    fake, a fake without a mask and a mask of the wrong size."""
    folder.mkdir(parents=True)
    for kind in ODD_CONVERTIBLE + ODD_UNUSABLE:
        shutil.copy(bad_inputs[kind], folder / f"{kind}{bad_inputs[kind].suffix}")
    gen = folder.parent / "generated" / "extswap"
    (gen / "fake").mkdir(parents=True)
    (gen / "mask").mkdir()
    good = bad_inputs["good"]
    w, h = Image.open(good).size
    # The fakes are altered where their mask says (a byte-identical copy of a real photo labelled fake would be
    # left out of the index as a contradiction).
    fake = np.asarray(Image.open(good).convert("RGB")).copy()
    fake[h // 4: h // 2, w // 4: w // 2] = fake[h // 4: h // 2, w // 4: w // 2][:, ::-1]
    for name in ("ok", "nomask", "badmask"):
        Image.fromarray(fake).save(gen / "fake" / f"{name}.jpg", quality=95)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: h // 2, w // 4: w // 2] = 255
    Image.fromarray(mask).save(gen / "mask" / "ok.png")
    Image.fromarray(mask[: h // 2, : w // 2]).save(gen / "mask" / "badmask.png")


def snakemake(work: Path, *args: str, config: Path | None = None, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(config or work / "config.yaml"), "--cores", "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and r.returncode:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((work / "results").rglob("*.log"))
                         if "rror" in p.read_text())
        raise AssertionError(f"snakemake failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}\n{logs}")
    return r


class Run:
    def __init__(self, work: Path, cfg: dict):
        self.work, self.cfg = work, cfg
        self.dir = work / cfg["results_dir"] / cfg["run_name"]

    def copy(self, dst: Path) -> "Run":
        """A private copy of the finished run for a test that reruns it. copy2 keeps the mtimes, so Snakemake
        sees a complete run; not hard links: reruns write some outputs in place, which would change the shared
        run under the other tests."""
        shutil.copytree(self.work, dst, symlinks=True)
        return Run(dst, self.cfg)
