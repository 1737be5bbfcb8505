"""Apply a model bundle (``morphfuse export``) to your own images: is each one manipulated, and where?

  morphfuse detect photo.jpg more_photos/ --models results/demo/bundle --out detections/

Inputs: image files and folders (searched recursively for .jpg .jpeg .png .webp .bmp .tif .tiff; hidden files
and folders skipped). Per image, exactly as the workflow does it with the bundle's settings (bundle.json):
faces are detected (the bundle's backend and options), each face gets an adaptive crop (the whole image when
there is no face or a face fills most of it), LFDL scores every crop and gives its patch map, pasted back at the
original size; MITL looks at the whole image and gives a full-size mask; the two masks are fused (``--variant``,
default the bundle's: mdmf) at the bundle's kernel and threshold.

Outputs in --out (names: see below):
  masks/NAME.png          fused mask, same size as the image: 255 = manipulated, 0 = pristine
  prob/NAME_lfdl.png      LFDL probability map (grey level = round(255 x probability); black outside faces)
  prob/NAME_mitl.png      MITL probability map
  overlays/NAME.png       the image with the fused mask tinted red and outlined in yellow, the face crops in
                          green, and the verdict and scores written across the top
  scores.csv, scores.json one row per image: image (NAME), path, score (the image score: LFDL's, as in the
                          paper), mitl_score (MITL's score from its mask, for comparison), fake (score >= 0.5),
                          n_faces (faces detected), mask_fraction (share of the image's pixels in the fused
                          mask). scores.json also holds the settings used and the failed inputs.
  ledger.csv              one line per input that could not be used (stage, image, path, reason)

NAME: a file given on the command line is named by its file name without extension; a file found in a folder by
its path relative to that folder, '/' replaced by '__', without extension. Characters other than letters, digits,
'.', '_' and '-' become '_'. When two inputs would get the same NAME, the later one gets its extension appended
(photo_png), then a number (photo_2).

An unreadable input (corrupt, truncated, empty, not an image, too large) is skipped with one line on stderr and in
the ledger, and the others are still processed; the exit status is then 1 (0 when every input worked, 2 for a
usage problem such as a damaged bundle). Scores near 0.5 are uncertain; the models' limitations are in the
bundle's MODEL_CARD.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .imageio import IMAGE_EXTENSIONS, BadImageError, prob_to_uint8, read_image, walk_images, \
    write_csv, write_png, write_text_atomic
from .ledger import Ledger

log = logging.getLogger(__name__)

STAGE = "detect"
COLUMNS = ["image", "path", "score", "mitl_score", "fake", "n_faces", "mask_fraction"]


# ------------------------------------------------------------------------------------------------- inputs
@dataclass
class Item:
    name: str
    path: Path


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text``: '/' → '__', anything but ``[A-Za-z0-9._-]`` → '_', no leading dot."""
    s = text.replace("\\", "/").replace("/", "__")
    s = re.sub(r"[^A-Za-z0-9._-]", "_", s).lstrip(".")
    return s or "image"


def collect_inputs(paths: list[str], listed: tuple[Path, list[str]] | None = None
                   ) -> tuple[list[Item], list[tuple[str, str]]]:
    """The images to process, with unique names, and the ``(path, reason)`` of arguments that do not exist.
    ``listed``: ``(root, relative paths)`` named as if found in the folder ``root`` (``--input-list``)."""
    items: list[Item] = []
    missing: list[tuple[str, str]] = []
    taken: set[str] = set()
    seen: set[Path] = set()

    def add(path: Path, rel: str) -> None:
        key = path.resolve()
        if key in seen:
            return
        seen.add(key)
        stem = rel[: -len(path.suffix)] if path.suffix and rel.endswith(path.suffix) else rel
        name = safe_name(stem)
        if name in taken:
            name = safe_name(f"{stem}_{path.suffix.lstrip('.')}") if path.suffix else name
        base, k = name, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        items.append(Item(name, path))

    for rel in (listed[1] if listed else []):
        if (listed[0] / rel).is_file():
            add(listed[0] / rel, rel)
        else:
            missing.append((str(listed[0] / rel), "no such file (listed in --input-list)"))
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            for f in walk_images(p):
                add(f, f.relative_to(p).as_posix())
        elif p.is_file():
            add(p, p.name)
        else:
            missing.append((arg, "no such file or folder"))
    return items, missing


# ------------------------------------------------------------------------------------------- one image
@dataclass
class Result:
    score: float            # LFDL image score (the release's rule over the face crops)
    mitl_score: float       # MITL score from its full-size mask
    lfdl_prob: np.ndarray   # H×W uint8, round(255·p)
    mitl_prob: np.ndarray   # H×W uint8, round(255·p)
    fused: np.ndarray       # H×W bool


class Detector:
    """The bundle's models and settings; :meth:`predict` runs the whole chain on a list of RGB images."""

    def __init__(self, bundle, device="cpu", variant: str | None = None, kernel: int | None = None,
                 threshold: float | None = None, batch_size: int = 8):
        import torch

        from .faces.backends import get_backend
        from .fusion import VARIANTS, check_kernel, check_threshold

        meta = bundle.meta
        self.device = torch.device(device)
        self.variant = variant or meta["fusion"].get("variant", "mdmf")
        if self.variant not in VARIANTS:
            raise UserError(f"--variant {self.variant!r}: expected one of {', '.join(VARIANTS)}")
        try:
            self.kernel = check_kernel(int(kernel if kernel is not None else meta["fusion"]["kernel"]))
            self.threshold = check_threshold(threshold if threshold is not None else meta["fusion"]["threshold"])
        except ValueError as e:
            raise UserError(f"fusion setting: {e}") from None
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: must be >= 1")
        self.batch_size = int(batch_size)
        self.margin = float(meta["crops"]["margin"])
        self.max_frac = float(meta["crops"]["max_face_area_fraction"])
        mitl_rule = meta["score_rules"]["mitl"]
        self.mitl_rule, self.mitl_percent = mitl_rule["rule"], float(mitl_rule["percent"])
        self.fake_threshold = float(meta["score_rules"].get("fake_threshold", 0.5))
        self.lfdl = bundle.load_model("lfdl", self.device)
        self.mitl = bundle.load_model("mitl", self.device)  # in eval mode
        if callable(getattr(self.mitl, "fuse_for_inference", None)):
            self.mitl.fuse_for_inference()  # AMW block: 3 convs run as 1 (fewer FLOPs; same up to float rounding)
        self.lfdl_size = int(meta["models"]["lfdl"]["size"])
        self.mitl_size = int(meta["models"]["mitl"]["size"])
        self.backend = get_backend(meta["faces"]["backend"], **(meta["faces"].get("options") or {}))

    def _run(self, model, arrays: np.ndarray, inputs) -> tuple[np.ndarray, np.ndarray]:
        import torch

        scores, maps = [], []
        for i in range(0, len(arrays), self.batch_size):
            batch = inputs(arrays[i:i + self.batch_size])
            with torch.no_grad():
                s, m = model.predict_proba(batch)
            scores.append(s.float().reshape(-1).cpu().numpy())
            maps.append(m.float()[:, 0].cpu().numpy())
        return np.concatenate(scores), np.concatenate(maps)

    def crops_of(self, rgb: np.ndarray):
        """Faces and adaptive crops of one image (the crops stage's rules)."""
        from .faces.crops import crop_boxes

        faces = self.backend.detect(rgb)
        h, w = rgb.shape[:2]
        return faces, crop_boxes(faces, w, h, self.margin, self.max_frac)

    def predict(self, images: list[np.ndarray], crops: list[list]) -> list[Result]:
        """Scores and masks of images whose crops are known (``crops_of``)."""
        from .features import lfdl_inputs_from_rgb, mitl_inputs_from_rgb, resize_image
        from .fusion import fuse_masks
        from .predict import lfdl_image_prob, mitl_image_prob

        low_band = getattr(self.mitl, "low_band", "l_shape")
        flat = [resize_image(rgb[c.y0:c.y1, c.x0:c.x1], self.lfdl_size) for rgb, cs in zip(images, crops) for c in cs]
        face_scores, patch_maps = self._run(
            self.lfdl, np.stack(flat), lambda a: lfdl_inputs_from_rgb(a, self.device, with_srm=False))
        whole = np.stack([resize_image(rgb, self.mitl_size) for rgb in images])
        _, mitl_maps = self._run(
            self.mitl, whole, lambda a: mitl_inputs_from_rgb(a, low_band, self.device, with_dct=False))
        out, pos = [], 0
        for k, (rgb, cs) in enumerate(zip(images, crops)):
            hw = rgb.shape[:2]
            score, lfdl_prob = lfdl_image_prob(face_scores[pos:pos + len(cs)], patch_maps[pos:pos + len(cs)],
                                               [(c.x0, c.y0, c.x1, c.y1) for c in cs], hw)
            pos += len(cs)
            mitl_score, mitl_prob = mitl_image_prob(mitl_maps[k], hw, self.mitl_rule, self.mitl_percent)
            lfdl_u8, mitl_u8 = prob_to_uint8(lfdl_prob), prob_to_uint8(mitl_prob)
            fused = fuse_masks(lfdl_u8, mitl_u8, self.variant, self.kernel, self.threshold)
            out.append(Result(score, mitl_score, lfdl_u8, mitl_u8, fused))
        return out


# ---------------------------------------------------------------------------------------------- overlay
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def overlay_image(rgb: np.ndarray, fused: np.ndarray, crops, score: float, mitl_score: float, fake: bool,
                  n_faces: int, variant: str) -> np.ndarray:
    """The image (same size) with the fused mask tinted red and outlined, face crops in green, and a top band
    with the verdict and scores."""
    import cv2
    from PIL import Image, ImageDraw

    from .forge.contact_sheet import overlay

    h, w = rgb.shape[:2]
    out = overlay(rgb, fused.astype(bool))
    thick = max(1, min(h, w) // 300)
    for c in crops:
        if c.face_idx >= 0:
            cv2.rectangle(out, (int(c.x0), int(c.y0)), (int(c.x1) - 1, int(c.y1) - 1), (0, 220, 0), thick)
    size = max(10, min(w // 32, 28))
    font = _font(size)
    verdict = "FAKE" if fake else "REAL"
    texts = [f"{verdict}  score {score:.3f}  |  MITL {mitl_score:.3f}  |  faces {n_faces}  |  "
             f"mask {fused.mean():.1%} ({variant})", f"{verdict} {score:.2f}", verdict]
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img, "RGBA")
    text = next((t for t in texts if draw.textlength(t, font=font) <= w - 8), texts[-1])
    band = min(h, size + 8)
    draw.rectangle([0, 0, w, band], fill=(0, 0, 0, 170))
    draw.text((4, 3), text, fill=(255, 70, 70) if fake else (120, 255, 120), font=font)
    return np.asarray(img)


# ---------------------------------------------------------------------------------------------------- run
def detect(inputs: list[str], models: str | os.PathLike, out: str | os.PathLike, variant: str | None = None,
           device: str = "auto", batch_size: int = 8, kernel: int | None = None, threshold: float | None = None,
           progress: bool = True, listed: tuple[Path, list[str]] | None = None) -> dict:
    """Run detection; returns ``{"rows": [...], "failed": n, "images": n}`` and writes everything in ``out``."""
    import torch
    from tqdm import tqdm

    from .export import load_bundle

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch finds no CUDA device")
    dev = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    bundle = load_bundle(models)
    items, missing = collect_inputs(inputs, listed)
    if not items and not missing and listed is None:
        raise UserError(f"no image files found in {', '.join(inputs)} (looked for {' '.join(IMAGE_EXTENSIONS)})")
    det = Detector(bundle, dev, variant, kernel, threshold, batch_size)
    out = Path(out)
    for sub in ("masks", "prob", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ledger = Ledger(STAGE)
    rows: list[dict] = []
    interactive = sys.stderr.isatty()
    bar = tqdm(total=len(items), desc="detect", unit="img", file=sys.stderr, disable=not progress,
               mininterval=0.5 if interactive else 30.0, dynamic_ncols=interactive)

    def fail(name: str, path, reason: str) -> None:
        ledger.add(name, path, reason)
        msg = f"morphfuse detect: skipped {path}: {' '.join(str(reason).split())}"
        if progress:
            tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    for path, reason in missing:
        fail(safe_name(Path(path).stem or path), path, reason)
    try:
        for start in range(0, len(items), det.batch_size):
            chunk = items[start:start + det.batch_size]
            ok: list[tuple[Item, np.ndarray, list, list]] = []
            for it in chunk:
                try:
                    rgb = read_image(it.path)
                    faces, crops = det.crops_of(rgb)
                except BadImageError as e:
                    fail(it.name, it.path, e.reason)
                    bar.update(1)
                    continue
                except Exception as e:  # noqa: BLE001 - one odd image must not stop the others
                    log.debug("face detection failed on %s", it.path, exc_info=True)
                    fail(it.name, it.path, f"face detection failed ({type(e).__name__}: {e})")
                    bar.update(1)
                    continue
                ok.append((it, rgb, faces, crops))
            if not ok:
                continue
            results = det.predict([o[1] for o in ok], [o[3] for o in ok])
            for (it, rgb, faces, crops), r in zip(ok, results):
                fake = bool(r.score >= det.fake_threshold)
                write_png(out / "masks" / f"{it.name}.png", r.fused)
                write_png(out / "prob" / f"{it.name}_lfdl.png", r.lfdl_prob)
                write_png(out / "prob" / f"{it.name}_mitl.png", r.mitl_prob)
                write_png(out / "overlays" / f"{it.name}.png",
                          overlay_image(rgb, r.fused, crops, r.score, r.mitl_score, fake, len(faces), det.variant))
                rows.append({"image": it.name, "path": str(it.path), "score": float(r.score),
                             "mitl_score": float(r.mitl_score), "fake": fake, "n_faces": len(faces),
                             "mask_fraction": float(r.fused.mean())})
                bar.update(1)
    finally:
        bar.close()

    import pandas as pd

    write_csv(out / "scores.csv", pd.DataFrame(rows, columns=COLUMNS))
    settings = {"bundle": str(bundle.path.resolve()), "config_hash": bundle.meta["config"].get("hash"),
                "variant": det.variant, "kernel": det.kernel, "threshold": det.threshold,
                "fake_threshold": det.fake_threshold, "image_score": "lfdl", "device": dev,
                "faces": bundle.meta["faces"], "crops": bundle.meta["crops"]}
    doc = {"settings": settings, "images": rows, "failed": ledger.rows}
    write_text_atomic(out / "scores.json", json.dumps(doc, indent=2, default=_json_default) + "\n")
    ledger.write(out / "ledger.csv")
    return {"rows": rows, "failed": len(ledger), "images": len(items) + len(missing)}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        v = float(o)
        return v if math.isfinite(v) else None
    return str(o)


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .fusion import VARIANTS

    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--input-list", metavar="TXT", help="also the files listed here (one path a line, relative to "
                   "--input-root), named as when found in that folder (the workflow's bulk target)")
    p.add_argument("--input-root", metavar="DIR", help="folder of the --input-list paths (default: the list's)")
    p.add_argument("--models", required=True, metavar="BUNDLE",
                   help="model bundle folder written by `morphfuse export` (checked against its hashes)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (masks/, prob/, overlays/, scores)")
    p.add_argument("--variant", choices=VARIANTS, default=None,
                   help="mask fusion: mdmf (default: the bundle's), closing_or, naive_or, or one branch alone "
                        "(lfdl, mitl)")
    p.add_argument("--kernel", type=int, default=None, help="fusion kernel side, odd (default: the bundle's)")
    p.add_argument("--threshold", type=float, default=None,
                   help="mask probability threshold (default: the bundle's, 0.5)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the networks run (default: auto = cuda if available)")
    p.add_argument("--batch-size", type=int, default=8, help="images (and face crops) per forward pass (8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    listed = None
    if args.input_list:
        lst = Path(args.input_list)
        if not lst.is_file():
            raise UserError(f"--input-list {lst}: no such file")
        listed = (Path(args.input_root) if args.input_root else lst.parent,
                  [line for line in lst.read_text().splitlines() if line.strip()])
    elif not args.inputs:
        raise UserError("give images or folders, or --input-list")
    res = detect(args.inputs, args.models, args.out, variant=args.variant, device=args.device,
                 batch_size=args.batch_size, kernel=args.kernel, threshold=args.threshold,
                 progress=not args.no_progress, listed=listed)
    n_fake = sum(r["fake"] for r in res["rows"])
    log.info("detect: %d input(s): %d processed (%d called fake), %d failed -> %s", res["images"], len(res["rows"]),
             n_fake, res["failed"], args.out)
    if res["failed"]:
        print(f"morphfuse detect: {res['failed']} input(s) could not be used; see {Path(args.out) / 'ledger.csv'}",
              file=sys.stderr)
        return 1
    return 0
