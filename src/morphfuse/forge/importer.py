"""Import forgeries made by external generators (SimSwap, MaskFaceGAN, FaceDancer, BELM, ...).

Layout: ``<root>/<method>/fake/**`` with masks of the same relative path and stem in ``<root>/<method>/mask/``
or ``<root>/<method>/masks/`` (any image extension). Each pair is checked before it becomes a manifest row:

- the fake is readable; a mask with the same stem exists (exactly one) and is readable;
- the mask has the fake's size;
- the mask is read by ``imageio.read_mask``, the one reader of binary masks (0/255, 0/1 (noted once in the
  ledger), palette, 16-bit, colour); a mask with values but none above its threshold is refused, never empty;
- the mask is binary: pixels that are neither of its two codes are allowed up to ``nonbinary_tolerance``
  (default 1 %, resampling or JPEG noise). Above it the pair is still imported, but a ``warning:`` line goes to
  the ledger: every reader binarises it the same way, the file is not rewritten;
- the mask is not empty.

Refused pairs go to the ledger, one line each; nothing is skipped silently.
Identity and split of an imported fake are unknown to the files: ``group`` defaults to the file's own identity
(``<method>/<relative stem>``, the SYSTEM.md default rule), ``split`` to what the caller passes ("" = decided by
the index stage); ``source_groups`` / ``source_ids`` are left empty.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pandas as pd

from ..imageio import BadImageError, EncodingNotes, MaskNotes, binarize_mask, is_image_file, mask_values, \
    nonbinary_fraction, read_image
from ..ledger import Ledger

MASK_DIRS = ("mask", "masks")
COLUMNS = ["image_id", "root", "path", "label", "mask_path", "source", "method", "group", "source_groups",
           "source_ids", "split", "width", "height"]


def _safe_id(s: str) -> str:
    return s.replace("/", "__").replace("\\", "__")


def find_methods(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "fake").is_dir())


def _mask_index(method_dir: Path) -> dict[str, list[Path]]:
    """Relative stem ('sub/name') -> mask files found under mask/ and masks/."""
    out: dict[str, list[Path]] = {}
    for d in MASK_DIRS:
        base = method_dir / d
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if p.is_file() and is_image_file(p):
                out.setdefault(str(p.relative_to(base).with_suffix("")).replace(os.sep, "/"), []).append(p)
    return out


def check_pair(fake: Path, masks: list[Path], nonbinary_tolerance: float = 0.01,
               notes: EncodingNotes | None = None):
    """Check one fake/mask pair. Returns (width, height, mask path, warning or None), or raises BadImageError.
    ``notes`` counts masks stored as 0/1."""
    rgb = read_image(fake)
    h, w = rgb.shape[:2]
    if not masks:
        raise BadImageError(fake, f"no mask with the same name in {' or '.join(d + '/' for d in MASK_DIRS)}")
    if len(masks) > 1:
        raise BadImageError(fake, "several masks with the same name: " + ", ".join(str(m) for m in masks))
    mpath = masks[0]
    values = mask_values(mpath)
    if values.shape[:2] != (h, w):
        raise BadImageError(mpath, f"mask is {values.shape[1]}x{values.shape[0]} but its fake is {w}x{h}")
    if not binarize_mask(values, mpath, notes).any():
        raise BadImageError(mpath, "mask is empty (no manipulated pixel): a fake needs its manipulated region")
    frac = nonbinary_fraction(values)
    warning = None
    if frac > nonbinary_tolerance:
        warning = (f"warning: {frac:.1%} of mask pixels are neither 0 nor 255 (tolerance "
                   f"{nonbinary_tolerance:.1%}); imported, binarised at > 127 when read")
    return w, h, mpath, warning


def import_generated(root: str | os.PathLike, methods: list[str] | None = None, *, split: str = "",
                     identity: Callable[[str, str], str] | None = None, nonbinary_tolerance: float = 0.01,
                     ledger: Ledger | None = None, source: str = "import", progress: bool = False) -> pd.DataFrame:
    """Manifest rows for every valid ``<root>/<method>/fake`` image; refused ones go to ``ledger``.

    ``identity(method, relative_path) -> group`` maps a file (its path under ``<method>/fake/``, extension included)
    to the person shown (default: each file its own identity, ``<method>/<relative stem>``).
    """
    from ..errors import UserError

    try:
        root = Path(root).resolve(strict=True)
    except (OSError, RuntimeError):
        root = Path(root)
    if not root.is_dir():
        raise UserError(f"import root {root} is not a directory (expected <root>/<method>/fake and mask/)")
    ledger = ledger if ledger is not None else Ledger("forge_import")
    methods = methods or find_methods(root)
    if not methods:
        raise UserError(f"import root {root}: no <method>/fake/ folder in it (expected <root>/<method>/fake and mask/)")
    notes = MaskNotes("generator mask")
    rows = []
    for method in methods:
        mdir = root / method
        if not (mdir / "fake").is_dir():
            ledger.add(f"{method}", mdir, f"no fake/ folder under {mdir}")
            continue
        masks = _mask_index(mdir)
        fakes = sorted(p for p in (mdir / "fake").rglob("*") if p.is_file())
        it = fakes
        if progress:
            from tqdm import tqdm
            it = tqdm(fakes, desc=f"import {method}", unit="img")
        seen: set[str] = set()
        for fake in it:
            rel_stem = str(fake.relative_to(mdir / "fake").with_suffix("")).replace(os.sep, "/")
            image_id = f"{method}__{_safe_id(rel_stem)}"
            if not is_image_file(fake):
                ledger.add(image_id, fake, "not an image file (unknown extension)")
                continue
            if image_id in seen:
                ledger.add(image_id, fake, "two fakes with the same name and different extensions")
                continue
            seen.add(image_id)
            try:
                w, h, mpath, warning = check_pair(fake, masks.get(rel_stem, []), nonbinary_tolerance, notes)
            except BadImageError as e:
                ledger.add(image_id, e.path, e.reason)
                continue
            if warning:
                ledger.add(image_id, mpath, warning)
            rows.append({
                "image_id": image_id, "root": str(root), "path": fake.relative_to(root).as_posix(), "label": 1,
                "mask_path": mpath.relative_to(root).as_posix(), "source": source, "method": method,
                "group": (identity(method, fake.relative_to(mdir / "fake").as_posix()) if identity
                          else f"{method}/{rel_stem}"),
                "source_groups": "", "source_ids": "", "split": split, "width": int(w), "height": int(h)})
    notes.write(ledger)
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype({"label": "int64", "width": "int64", "height": "int64"})
