"""Shared fixtures: paths to the demo photos (read-only) and a folder of deliberately bad inputs."""
from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FACES = (REPO / ".." / "shared" / "data" / "faces").resolve()
LONDON_512 = FACES / "london_512"


def london(n: int = 4, folder: str = "neutral_front") -> list[Path]:
    """The first ``n`` demo photos of a folder (read-only: copy before writing anywhere near them)."""
    return sorted((LONDON_512 / folder).glob("*.jpg"))[:n]


class CachedBackend:
    """The real dlib face backend, each image detected once (forgery tests detect the same photos often)."""

    def __init__(self):
        from morphfuse.faces.backends import get_backend

        self.inner, self.cache = get_backend("dlib"), {}

    def detect(self, rgb):
        key = hashlib.sha1(rgb.tobytes()).hexdigest() + str(rgb.shape)
        if key not in self.cache:
            self.cache[key] = self.inner.detect(rgb)
        return self.cache[key]


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    """One file per kind of bad or awkward input the pipeline must handle (issue 2's list)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    src = london(1)[0]
    good = np.asarray(Image.open(src).convert("RGB"))
    out: dict[str, Path] = {}

    jpeg = src.read_bytes()
    p = d / "corrupt.jpg"  # header intact, entropy-coded data overwritten
    b = bytearray(jpeg)
    b[len(b) // 3: len(b) // 3 + 4000] = bytes(4000)
    b = b[: len(b) // 2]
    p.write_bytes(bytes(b))
    out["corrupt_jpeg"] = p

    buf = io.BytesIO()
    Image.fromarray(good).save(buf, format="PNG")
    p = d / "truncated.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated_png"] = p
    p = d / "empty.jpg"
    p.write_bytes(b"")
    out["zero_byte"] = p
    p = d / "text.jpg"
    p.write_text("this is not an image\n")
    out["text_as_jpg"] = p

    p = d / "gray.png"
    Image.fromarray(good[..., 0]).save(p)
    out["grayscale"] = p
    p = d / "deep16.png"
    Image.fromarray((good[..., 1].astype(np.uint16) * 257)).save(p)
    out["png16"] = p
    p = d / "rgba.png"
    Image.fromarray(np.dstack([good, np.full(good.shape[:2], 128, np.uint8)])).save(p)
    out["rgba"] = p
    p = d / "cmyk.jpg"
    Image.fromarray(good).convert("CMYK").save(p, quality=95)
    out["cmyk"] = p
    p = d / "bomb.png"
    Image.new("L", (9500, 9500)).save(p, optimize=False, compress_level=1)
    out["bomb"] = p

    # EXIF orientation 6 = "rotate 90° clockwise to view": stored landscape-wise, shown as the original portrait.
    p = d / "exif_rotated.jpg"
    stored = Image.fromarray(good).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[274] = 6
    stored.save(p, exif=exif, quality=95)
    out["exif_rotated"] = p
    shutil.copy(src, d / "good.jpg")
    out["good"] = d / "good.jpg"
    return out


@pytest.fixture(scope="session")
def e2e(tmp_path_factory, bad_inputs):
    """The whole DAG, run ONCE per test session on a tiny config (tests/e2e_run.py), for the tests to inspect."""
    from e2e_run import Run, make_odd_inputs, snakemake, tiny_config
    import yaml

    import os

    work = tmp_path_factory.mktemp("e2e")
    make_odd_inputs(work / "odd", bad_inputs)
    cfg = tiny_config(work)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    # Every stage process records the package modules it loaded (the code-hash coverage test reads them).
    snakemake(work, env=dict(os.environ, MORPHFUSE_RECORD_MODULES=str(work / "loaded_modules")))
    return Run(work, cfg)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """The two networks at size 64 (random weights) saved as training writes them, with a config, a manifest and a
    tables folder (tests/model_bundle.py). Built once per session (~1 GB): read-only, copy before changing."""
    for mod in ("timm", "transformers", "dlib"):
        pytest.importorskip(mod)
    from model_bundle import make_trained

    return make_trained(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def bundle(trained) -> Path:
    """``morphfuse export`` of ``trained``'s models: a real bundle, read-only for the tests (copy it to tamper)."""
    from model_bundle import make_bundle

    return make_bundle(trained)
