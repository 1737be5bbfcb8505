"""``morphfuse fuse``: MDMF (:mod:`morphfuse.fusion`) over folders of LFDL and MITL masks.

Both folders hold single-channel probability PNGs ``<image_id>.png`` (``v = round(255·p)``) at the original image
size. Each pair is binarised (``v / 255 >= threshold``), fused by the chosen variant and written to ``--out`` as a
binary 0/255 PNG of the same name:

  lfdl        M_LFDL
  mitl        M_MITL
  naive_or    M_LFDL ∪ M_MITL
  mdmf        dilate(M_LFDL, B) ∪ erode(M_MITL, B)              (the paper)
  closing_or  closing(M_LFDL, B) ∪ closing(M_MITL, B)           (the authors' released code)

B is a k×k square of ones (k odd, ``--kernel``, 5 by default); dilation and erosion follow OpenCV's border rule:
the image border neither dilates nor erodes a mask. Every image needs BOTH masks, of the same size, for every
variant (also ``lfdl`` and ``mitl``), so that all variants are computed on the same images. A mask without its
partner, a pair of different sizes or an unreadable file is listed at the end (and in ``--ledger``, appended as
found) and makes the exit status 1; all the good pairs are still written. ``--allow-errors`` exits 0 anyway (for
the workflow, whose tables count the ledger rows). Probability maps holding only the values 0 and 1 are read by
the contract (p <= 1/255: nothing reaches the threshold) and noted once in the ledger: they are most likely binary
masks that should have been stored as 0/255.

``--out`` belongs to one run (variant, kernel, threshold, input folders; recorded in ``--out/.morphfuse-run.json``):
another run's outputs there are refused (exit 2) unless ``--overwrite``; a second fuse into an --out in use is
refused (exit 2). Each mask is written atomically and then listed in ``--out/.morphfuse-done.csv`` with its inputs'
sizes and mtimes, so an interrupted run (SIGTERM, a full disk: exit 3, one line) keeps what it finished and the
same command resumes, skipping pairs whose inputs are unchanged.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ..errors import UserError, sigterm_raises
from ..imageio import AppendLog, BadImageError, EncodingNotes, ProbNotes, check_prob_encoding, csv_line, \
    binarize_prob_u8, check_threshold, image_hw, list_masks, read_complete_lines, read_prob_u8, \
    write_mask_png
from ..inputs import read_ids
from ..ledger import Ledger
from ..fusion import VARIANTS, _fuse_u8, check_kernel

log = logging.getLogger(__name__)
STAGE = "fuse"


def fuse_pair(lfdl_path: Path, mitl_path: Path, out_path: Path, variant: str, kernel: int,
              threshold: float, notes: EncodingNotes | None = None) -> None:
    """Read one pair, fuse and write it. Raises ``BadImageError`` (a file) or ``ValueError`` (the pair).
    ``notes`` (:func:`imageio.ProbNotes`) counts maps that hold only 0 and 1."""
    if variant in ("lfdl", "mitl"):
        # Only one branch's pixels are needed; the partner is still checked (readable header, same size).
        if variant == "lfdl":
            a = read_prob_u8(lfdl_path)
            check_prob_encoding(a, lfdl_path, notes)
            lfdl_hw, mitl_hw = a.shape, image_hw(mitl_path)
        else:
            a = read_prob_u8(mitl_path)
            check_prob_encoding(a, mitl_path, notes)
            lfdl_hw, mitl_hw = image_hw(lfdl_path), a.shape
        if lfdl_hw != mitl_hw:
            raise ValueError(_size_reason(lfdl_hw, mitl_hw))
        out = binarize_prob_u8(a, threshold)
    else:
        a, b = read_prob_u8(lfdl_path), read_prob_u8(mitl_path)
        check_prob_encoding(a, lfdl_path, notes)
        check_prob_encoding(b, mitl_path, notes)
        if a.shape != b.shape:
            raise ValueError(_size_reason(a.shape, b.shape))
        out = _fuse_u8(a, b, variant, kernel, threshold)
    write_mask_png(out_path, out)


def _size_reason(lfdl_hw, mitl_hw) -> str:
    return (f"size mismatch: LFDL mask is {lfdl_hw[1]}x{lfdl_hw[0]}, MITL mask is {mitl_hw[1]}x{mitl_hw[0]} "
            "(both must be at the original image size)")


# ----------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lfdl-masks", required=True, type=Path, metavar="DIR",
                   help="LFDL probability masks <image_id>.png")
    p.add_argument("--mitl-masks", required=True, type=Path, metavar="DIR",
                   help="MITL probability masks <image_id>.png")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder for the fused 0/255 masks")
    p.add_argument("--variant", required=True, choices=VARIANTS, help="fusion variant (see above)")
    from ..config import default

    p.add_argument(
        "--kernel",
        type=int,
        default=default("fusion.kernel"),
        help="side k of the k×k structuring element, odd (default: the config schema's fusion.kernel, %(default)s)",
    )
    p.add_argument("--threshold", type=float, default=default("fusion.threshold"),
                   help="binarise v/255 >= threshold (default 0.5, i.e. v >= 128)")
    p.add_argument("--thresholds", type=Path, metavar="JSON",
                   help="take the threshold from this `morphfuse thresholds` file (its mask_threshold, fitted on "
                        "val) instead of --threshold")
    p.add_argument("--ids", type=Path, metavar="FILE",
                   help="only these image_ids (one per line; a file or a pipe), e.g. one shard; each must have "
                        "both masks")
    p.add_argument("--ledger", type=Path, metavar="CSV", help="also write the errors as a ledger CSV (appended as "
                   "they are found)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds another run's masks (other variant, kernel, threshold or inputs): remove them "
                        "first (without it such an --out is refused)")
    p.add_argument("--allow-errors", action="store_true",
                   help="exit 0 even when some inputs were bad (they are still listed and in the ledger)")


DONE_NAME = ".morphfuse-done.csv"


def _stamp(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _read_done(out: Path) -> dict[str, tuple[str, str]]:
    """``image_id -> (lfdl stamp, mitl stamp)`` of the masks an earlier run into ``out`` finished."""
    import csv

    done = {}
    rows = csv.reader(read_complete_lines(out / DONE_NAME).splitlines())
    next(rows, None)
    for r in rows:
        if len(r) == 3:
            done[r[0]] = (r[1], r[2])
    return done


def run(args: argparse.Namespace) -> int:
    try:
        kernel = check_kernel(args.kernel)
        threshold = check_threshold(args.threshold)
        if args.thresholds is not None:
            from ..thresholds import read_thresholds

            threshold = check_threshold(read_thresholds(args.thresholds)["mask_threshold"])
    except ValueError as e:
        raise UserError(str(e)) from None
    for flag, d in (("--lfdl-masks", args.lfdl_masks), ("--mitl-masks", args.mitl_masks)):
        if not d.is_dir():
            raise UserError(f"{flag} {d}: not a folder")
        if args.out.exists() and os.path.samefile(d, args.out):
            raise UserError(f"--out {args.out} is the {flag} folder: the fused masks would replace their inputs; "
                            "choose another --out")
    ids = read_ids(args.ids) if args.ids is not None else None
    if ids is not None and not ids:
        raise UserError(f"--ids {args.ids}: lists no image_id (one per line; blank lines and # comments are "
                        "ignored)")
    lfdl, mitl = list_masks(args.lfdl_masks), list_masks(args.mitl_masks)
    if ids is None:
        ids = sorted(set(lfdl) | set(mitl))
    settings = {"variant": args.variant, "kernel": kernel, "threshold": threshold,
                "lfdl_masks": os.path.abspath(args.lfdl_masks), "mitl_masks": os.path.abspath(args.mitl_masks)}
    from ..outdir import RunFolder

    with RunFolder(args.out, STAGE, settings, ["*.png", DONE_NAME], overwrite=args.overwrite) as folder, \
            sigterm_raises():
        return _fuse_into(folder, args, ids, lfdl, mitl, kernel, threshold)


def _fuse_into(folder, args, ids, lfdl, mitl, kernel, threshold) -> int:
    out = folder.path
    done = _read_done(out) if folder.resumed else {}
    ledger = Ledger(STAGE)
    if args.ledger is not None:
        ledger.stream_to(args.ledger)
    notes = ProbNotes()
    done_log = AppendLog(out / DONE_NAME, header="image_id,lfdl,mitl")
    n_ok = n_skipped = 0
    t0 = time.perf_counter()
    try:
        for image_id in ids:
            if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
                ledger.add(image_id, args.ids, "not a valid image_id (an image_id is a file name: no / or \\)")
                continue
            a, b = lfdl.get(image_id), mitl.get(image_id)
            if a is None or b is None:
                missing = [(n, d) for n, x, d in (("LFDL", a, args.lfdl_masks), ("MITL", b, args.mitl_masks))
                           if x is None]
                reason = "; ".join(f"no {n} mask {image_id}.png in {d}" for n, d in missing)
                ledger.add(image_id, a or b or args.lfdl_masks / f"{image_id}.png",
                           ("missing partner: " if len(missing) == 1 else "missing both masks: ") + reason)
                continue
            target = out / f"{image_id}.png"
            try:
                stamps = (_stamp(a), _stamp(b))
            except OSError as e:
                ledger.add(image_id, a, f"cannot be read ({e.strerror or e})")
                continue
            if done.get(image_id) == stamps and target.is_file():
                n_skipped += 1
                continue
            try:
                fuse_pair(a, b, target, args.variant, kernel, threshold, notes)
            except BadImageError as e:
                ledger.add(image_id, e.path, e.reason)
                continue
            except ValueError as e:
                ledger.add(image_id, a, str(e))
                continue
            done_log.append(csv_line([image_id, *stamps]))
            n_ok += 1
        notes.write(ledger)
    finally:
        done_log.close()
        ledger.close()
    dt = time.perf_counter() - t0
    log.info("fuse %s: %d masks written to %s, %d already done, %d errors (%.1f images/s)", args.variant, n_ok,
             out, n_skipped, ledger.n_errors, n_ok / dt if dt > 0 else float("nan"))
    if n_skipped:
        print(f"morphfuse fuse: {n_skipped} mask(s) already done in {out} with the same settings and unchanged "
              "inputs: skipped", file=sys.stderr)
    if notes.count:
        print(f"morphfuse fuse: note: {notes.message()}", file=sys.stderr)
    if ledger.n_errors:
        print(f"morphfuse fuse: {ledger.n_errors} image(s) not fused:", file=sys.stderr)
        for r in ledger.rows:
            if not r["reason"].startswith(("note:", "warning:")):
                print(f"  {r['image_id']}: {r['path']}: {r['reason']}", file=sys.stderr)
        return 0 if args.allow_errors else 1
    return 0
