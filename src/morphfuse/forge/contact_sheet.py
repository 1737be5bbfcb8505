"""Contact sheets of forgeries: one row per forgery, ``fake | mask overlay | source`` (+ ``donor`` when the
forgery mixes people), with the photos' licence attribution drawn into the image.

The attribution is the one the config declares per source (``sources[].attribution``, :mod:`morphfuse.attribution`;
the demo's London Set photos are CC BY 4.0, data/faces/README.md): it is part of the PNG, not a caption beside it.
Without a config, or when no source declares one, the sheet says so instead.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ..attribution import attribution_text
from ..overlay import load_font, tint
from ..imageio import BadImageError, read_image, read_mask, write_png

NO_ATTRIBUTION = "Photo licences: no source of the config declares an attribution (sources[].attribution)."


def _tile(rgb: np.ndarray | None, h: int, label: str, font) -> Image.Image:
    if rgb is None:
        img = Image.new("RGB", (h, h), (60, 60, 60))
    else:
        scale = h / rgb.shape[0]
        img = Image.fromarray(cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)), h), interpolation=cv2.INTER_AREA))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, img.width, 16], fill=(0, 0, 0))
    d.text((3, 1), _fit(label, font, img.width - 6), fill=(255, 255, 255), font=font)
    return img


def _fit(text: str, font, width: int) -> str:
    """Shorten ``text`` from the middle ("fake: ...03__0") until it fits ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    head, _, tail = text.partition(": ")
    head = head + ": " if tail else ""
    tail = tail or text
    while tail and font.getlength(head + "..." + tail) > width:
        tail = tail[1:]
    return head + "..." + tail


def _read(root, rel):
    try:
        return read_image(Path(str(root)) / str(rel))
    except BadImageError:
        return None


def contact_sheet(rows: pd.DataFrame, out: str | os.PathLike, index: pd.DataFrame | None = None,
                  max_rows: int = 6, tile: int = 256, cfg: dict | None = None) -> Path:
    """Write a contact sheet PNG of the first ``max_rows`` forgeries (by image_id) and return its path.

    ``index`` (manifest columns) is used to find the source images named in ``source_ids``; ``cfg`` (the run's
    config) gives the sources' attributions drawn at the bottom.
    """
    rows = rows[rows["label"].astype(int) == 1].sort_values("image_id", kind="stable").head(max_rows)
    by_id = {}
    if index is not None:
        by_id = {str(r.image_id): r for r in index.itertuples(index=False)}
    has_donor = rows["source_ids"].astype(str).str.contains("|", regex=False).any()
    font, small = load_font(12), load_font(11)
    lines = []
    for r in rows.itertuples(index=False):
        fake = _read(r.root, r.path)
        try:
            mask = read_mask(Path(str(r.root)) / str(r.mask_path)) if fake is not None else None
        except BadImageError:
            mask = None
        ids = [s for s in str(r.source_ids).split("|") if s]
        src = by_id.get(ids[0]) if ids else None
        tiles = [_tile(fake, tile, f"fake: {r.image_id}", font),
                 _tile(tint(fake, mask) if mask is not None and mask.shape == fake.shape[:2] else None, tile,
                       f"mask ({mask.mean():.1%} of image)" if mask is not None else "mask: unreadable", font),
                 _tile(_read(src.root, src.path) if src is not None else None, tile,
                       f"source: {ids[0]}" if ids else "source: ?", font)]
        if has_donor:
            donor = by_id.get(ids[1]) if len(ids) > 1 else None
            extra = f" (+{len(ids) - 2})" if len(ids) > 2 else ""
            tiles.append(_tile(_read(donor.root, donor.path) if donor is not None else None, tile,
                               f"donor: {ids[1]}{extra}" if len(ids) > 1 else "donor: -", font))
        lines.append(tiles)
    methods = ", ".join(sorted(rows["method"].astype(str).unique())) or "none"
    width = max([sum(t.width for t in ts) + 4 * (len(ts) + 1) for ts in lines] + [900])
    credit = attribution_text(cfg, rows["method"].astype(str).unique()) if cfg is not None else None
    wrap = textwrap.wrap(credit or NO_ATTRIBUTION, width=max(60, width // 7))
    head_h, foot_h = 24, 14 * len(wrap) + 10
    height = head_h + sum(tile + 4 for _ in lines) + foot_h
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    d.text((6, 5), f"morphfuse forgeries: {methods}  ({len(lines)} shown)", fill=(0, 0, 0), font=font)
    y = head_h
    for ts in lines:
        x = 4
        for t in ts:
            sheet.paste(t, (x, y))
            x += t.width + 4
        y += tile + 4
    for i, line in enumerate(wrap):
        d.text((6, y + 5 + 14 * i), line, fill=(40, 40, 40), font=small)
    out = Path(out)
    write_png(out, np.asarray(sheet))
    return out
