"""``morphfuse forge``: forgeries with exact masks from one shard of real images; import; contact sheets.

  morphfuse forge <method> --index INDEX.parquet --shard K --shard-size N --out DIR [--seed S] [--per-real 1]
                  [--min-face-size PX] [--forehead | --no-forehead] [--ledger CSV] [--config config.yaml]
      method: sbi | random_combination | paste_random | sd_inpaint | diffusion_inversion
      Takes the real rows (label 0) of the index sorted by image_id, slice [K*N, (K+1)*N); detects faces
      (config faces.backend, dlib by default); writes DIR/images/{id}.png, DIR/masks/{id}.png (0/255),
      DIR/rows.parquet (manifest rows) and DIR/ledger.csv (inputs that could not be forged, one line each).
      Forgery id: {method}__{target image_id}__{k}, k < per_real. Donors of random_combination/paste_random
      come from the whole index: same split, other identity. A generator may hand back a companion REAL image
      (SBI with forge.sbi.target_transform: pair, when the colour transform hit the target): it is written as
      images/{companion method}__{target image_id}__{k}.png with a real row (label 0, no mask, the target's
      identity and split, method sbi_target, source_ids the target).
  morphfuse forge import --root DIR --out ROWS.parquet [--methods M ...] [--split S] [--ledger CSV]
      Rows for external generator outputs <root>/<method>/{fake,mask|masks}/ (forge/importer.py).
  morphfuse forge sheet --rows ROWS.parquet ... --out SHEET.png [--index INDEX.parquet] [--max-rows 6]
      A contact sheet (fake | mask overlay | source) with the photos' attribution.

Same seed and index give the same bytes (fakes are PNG, lossless).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import re
import sys
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from ..errors import UserError
from ..imageio import BadImageError, read_image, write_parquet, write_png
from ..ledger import Ledger
from .common import DonorPool, ForgeResult, Skip, check_faces, forge_image_id, rng_for

log = logging.getLogger(__name__)

# method -> (module, factory); imported only when used (diffusion pulls in torch/diffusers).
FACTORIES: dict[str, tuple[str, str]] = {
    "sbi": ("morphfuse.forge.sbi", "make_sbi"),
    "random_combination": ("morphfuse.forge.random_combination", "make_random_combination"),
    "paste_random": ("morphfuse.forge.random_combination", "make_paste_random"),
    "sd_inpaint": ("morphfuse.forge.diffusion", "make_sd_inpaint"),
    "diffusion_inversion": ("morphfuse.forge.diffusion", "make_diffusion_inversion"),
}
ROW_COLUMNS = ["image_id", "root", "path", "label", "mask_path", "source", "method", "group", "source_groups",
               "source_ids", "split", "width", "height", "fingerprint"]
INDEX_COLUMNS = ("image_id", "root", "path", "label", "group", "split")
COMPANION_METHOD = {"sbi": "sbi_target"}  # method of the real a generator hands back beside its fake
STAGE = "forge"


def make_generator(method: str, options: Mapping):
    if method not in FACTORIES:
        raise UserError(f"unknown forgery method {method!r}; expected one of {', '.join(FACTORIES)}")
    module, factory = FACTORIES[method]
    return getattr(importlib.import_module(module), factory)(dict(options))


def shard_rows(index: pd.DataFrame, shard: int, shard_size: int) -> pd.DataFrame:
    """Real rows (label 0) sorted by image_id, slice [shard*shard_size, (shard+1)*shard_size)."""
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise UserError(
            f"the index lacks the column(s) {', '.join(missing)}; expected manifest columns (ARCHITECTURE.md)"
        )
    if shard < 0 or shard_size <= 0:
        raise UserError(f"--shard must be >= 0 and --shard-size > 0, got {shard} and {shard_size}")
    reals = index[index["label"].astype(int) == 0].sort_values("image_id", kind="stable")
    return reals.iloc[shard * shard_size:(shard + 1) * shard_size].reset_index(drop=True)


class _FaceCache:
    """Detections by image_id, so that a target used again as a donor is not detected twice."""

    def __init__(self, backend):
        self.backend = backend
        self.faces: dict[str, list] = {}

    def detect(self, image_id: str, rgb: np.ndarray) -> list:
        if image_id not in self.faces:
            self.faces[image_id] = list(self.backend.detect(rgb))
        return self.faces[image_id]


def _abs_path(row: Mapping) -> Path:
    return Path(str(row["root"])) / str(row["path"])


def _donor_pool(index: pd.DataFrame, faces_of) -> DonorPool:
    """The donors of a generator that pastes other people's faces: read and detected on first use."""
    def load(row):
        try:
            rgb = read_image(_abs_path(row))
        except BadImageError as e:
            return f"unreadable: {e.reason}"
        try:
            return rgb, faces_of.detect(str(row["image_id"]), rgb)
        except Exception as e:  # noqa: BLE001 - a detector failure is a property of this input
            return f"face detection failed: {type(e).__name__}: {e}"
    return DonorPool(index, load)


def _usable_target(tid: str, src: str, faces_of, ledger: Ledger, min_face_size: float, needs_landmarks: bool):
    """``(rgb, faces)`` of a real image to forge, or None after a ledger line saying why it cannot be used."""
    try:
        rgb = read_image(src)
    except BadImageError as e:
        ledger.add(tid, src, f"unreadable: {e.reason}")
        return None
    try:
        faces = faces_of.detect(tid, rgb)
    except Exception as e:  # noqa: BLE001
        ledger.add(tid, src, f"face detection failed: {type(e).__name__}: {e}")
        return None
    reason = check_faces(faces, min_face_size, need_landmarks=needs_landmarks)
    if reason:
        ledger.add(tid, src, reason)
        return None
    return rgb, faces


def _write_forgery(out: Path, target, tid: str, k: int, fid: str, rgb: np.ndarray, res: ForgeResult) -> list[dict]:
    """Write one forgery's image and mask (and its companion real, if any); return their manifest rows."""
    out_rows: list[dict] = []
    h, w = rgb.shape[:2]
    write_png(out / "images" / f"{fid}.png", res.fake_rgb)
    write_png(out / "masks" / f"{fid}.png", res.mask.astype(np.uint8) * 255)
    companion = res.extra.get("companion_real")
    if companion is not None:  # a real to add beside the fake (SBI's transformed target)
        cmethod = COMPANION_METHOD.get(res.method, f"{res.method}_real")
        cid = forge_image_id(cmethod, tid, k)
        write_png(out / "images" / f"{cid}.png", companion)
        out_rows.append({"image_id": cid, "root": str(out), "path": f"images/{cid}.png", "label": 0,
                         "mask_path": "", "source": "forge", "method": cmethod,
                         "group": str(target["group"]), "source_groups": str(target["group"]),
                         "source_ids": tid, "split": str(target["split"]), "width": int(w), "height": int(h),
                         "fingerprint": hashlib.sha256(companion.tobytes()).hexdigest()[:16]})
    out_rows.append({"image_id": fid, "root": str(out), "path": f"images/{fid}.png", "label": 1,
                     "mask_path": f"masks/{fid}.png", "source": "forge", "method": res.method,
                     "group": str(target["group"]), "source_groups": "|".join(res.source_groups),
                     "source_ids": "|".join(res.source_ids), "split": str(target["split"]),
                     "width": int(w), "height": int(h),
                     # the generated content itself: identical reruns leave the manifest unchanged
                     "fingerprint": hashlib.sha256(res.fake_rgb.tobytes() + res.mask.tobytes()).hexdigest()[:16]})
    return out_rows


def _with_progress(targets: pd.DataFrame, desc: str):
    """``targets.iterrows()`` with a bar on stderr (live on a terminal, every 30 s in a log file)."""
    from tqdm import tqdm

    return tqdm(targets.iterrows(), total=len(targets), desc=desc, unit="img", file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def _write_shard(out: Path, rows: list[dict], ledger: Ledger, ledger_path) -> pd.DataFrame:
    """rows.parquet (the shard's manifest rows) and its ledger."""
    df = pd.DataFrame(rows, columns=ROW_COLUMNS).astype({"label": "int64", "width": "int64", "height": "int64"})
    write_parquet(out / "rows.parquet", df)
    ledger.write(Path(ledger_path) if ledger_path else out / "ledger.csv")
    return df


def forge_shard(
    index: pd.DataFrame,
    method: str,
    shard: int,
    shard_size: int,
    out: str | Path,
    *,
    seed: int = 0,
    per_real: int = 1,
    min_face_size: float = 0,
    options: Mapping | None = None,
    backend=None,
    generator=None,
    ledger_path: str | Path | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, Ledger]:
    """Forge one shard; writes images/, masks/, rows.parquet and the ledger under ``out``; returns (rows, ledger).

    ``backend`` is a face backend (``.detect(rgb) -> list[Face]``; default: dlib); ``generator`` overrides the
    method's factory (tests). Bad inputs go to the ledger; an exception inside the generator is recorded too,
    unless every forgery of the shard failed that way (a bug, not a bad input), which is re-raised.
    """
    out = Path(out).resolve()
    options = dict(options or {})
    options.setdefault("min_face_size", min_face_size)
    min_face_size = float(options["min_face_size"] or 0)
    if per_real < 1:
        raise UserError(f"--per-real must be >= 1, got {per_real}")
    gen = generator if generator is not None else make_generator(method, options)
    if backend is None:
        from ..faces.backends import get_backend
        backend = get_backend("dlib")
    faces_of = _FaceCache(backend)
    ledger = Ledger(STAGE)
    targets = shard_rows(index, shard, shard_size)
    needs_landmarks = getattr(gen, "needs_landmarks", True)

    pool = _donor_pool(index, faces_of) if getattr(gen, "needs_donors", False) else None

    rows: list[dict] = []
    n_errors = n_attempts = 0
    last_error: BaseException | None = None
    it = _with_progress(targets, f"forge {method} shard {shard}") if progress else targets.iterrows()
    t0 = time.perf_counter()
    for _, target in it:
        tid, src = str(target["image_id"]), _abs_path(target)
        usable = _usable_target(tid, src, faces_of, ledger, min_face_size, needs_landmarks)
        if usable is None:
            continue
        rgb, faces = usable
        for k in range(per_real):
            fid = forge_image_id(method, tid, k)
            rng = rng_for(seed, method, tid, k)
            n_attempts += 1
            try:
                res = gen(target, rgb, faces, rng, options, donors=pool)
                if isinstance(res, ForgeResult):
                    res.validate(rgb.shape[:2])
            except Exception as e:  # noqa: BLE001
                log.warning("%s: %s failed on %s", fid, method, src, exc_info=True)
                ledger.add(fid, src, f"{method} failed: {type(e).__name__}: {e}")
                n_errors, last_error = n_errors + 1, e
                continue
            if isinstance(res, Skip):
                ledger.add(fid, src, res.reason)
                continue
            if not res.mask.any():
                ledger.add(fid, src, f"{method} produced an empty mask")
                continue
            rows += _write_forgery(out, target, tid, k, fid, rgb, res)
    if pool is not None:
        for image_id, path, reason in pool.failures:
            ledger.add(image_id, path, f"unusable as a donor: {reason}")
    if n_errors and n_errors == n_attempts:
        raise last_error  # every forgery of the shard raised: a bug, not bad inputs
    df = _write_shard(out, rows, ledger, ledger_path)
    log.info("forge %s shard %d: %d forgeries (+ %d companion reals) from %d reals, %d ledger lines, %.1f s", method,
             shard, int((df["label"] == 1).sum()), int((df["label"] == 0).sum()), len(targets), len(ledger),
             time.perf_counter() - t0)
    return df, ledger


# ------------------------------------------------------------------------------------------------ the CLI
def _parse_shard(s: str) -> int:
    m = re.fullmatch(r"s?(\d+)", str(s))
    if not m:
        raise argparse.ArgumentTypeError(f"shard must be an integer or sNNNNN, got {s!r}")
    return int(m.group(1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="forge_command", metavar="<method> | import | sheet")
    sub.required = True
    for method in FACTORIES:
        p = sub.add_parser(method, help=f"forge one shard with {method}")
        p.add_argument("--index", required=True, help="index parquet (manifest columns; real rows have label 0)")
        p.add_argument(
            "--shard",
            type=_parse_shard,
            required=True,
            help="shard K of the index's real images (an integer: 3 or 00003; its forgeries go to "
            "forge/<method>/00003/)",
        )
        p.add_argument("--shard-size", type=int, default=None, help="reals per shard (default: --config's shard_size)")
        p.add_argument("--out", required=True, help="output folder: images/, masks/, rows.parquet, ledger.csv")
        p.add_argument("--seed", type=int, default=None, help="seed (default: --config's seed)")
        p.add_argument(
            "--per-real", type=int, default=None, help="forgeries per real image (default: --config's forge.per_real)"
        )
        p.add_argument("--min-face-size", type=float, default=None,
                       help="px; smaller largest faces go to the ledger (default: config forge.min_face_size, else 0)")
        p.add_argument("--forehead", action=argparse.BooleanOptionalAction, default=None,
                       help="extend the landmark hull over the forehead (default: the method's config)")
        p.add_argument("--ledger", default=None, help="ledger CSV (default: OUT/ledger.csv)")
        p.add_argument(
            "--config",
            default=None,
            help="config.yaml, or the inline JSON slice a rule passes: forge.<method> options, "
            "forge.per_real/min_face_size, faces:, seed, shard_size (default: the schema's defaults)",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("import", help="manifest rows for external generator outputs <root>/<method>/{fake,mask}")
    p.add_argument("--root", required=True,
                   help="folder of the external outputs: <root>/<method>/fake/ and <root>/<method>/mask/")
    p.add_argument("--out", required=True, help="rows parquet")
    p.add_argument("--methods", nargs="*", default=None, help="method folders (default: every one with fake/)")
    p.add_argument("--split", default="", help="split of the imported rows (default empty: the index decides)")
    p.add_argument("--nonbinary-tolerance", type=float, default=0.01,
                   help="fraction of mask pixels neither 0 nor 255 above which a warning is recorded")
    p.add_argument("--ledger", default=None, help="ledger CSV (default: beside --out, ledger.csv)")
    p = sub.add_parser("sheet", help="contact sheet PNG: fake | mask overlay | source, with attribution")
    p.add_argument("--rows", nargs="+", required=True, help="rows.parquet file(s) of forge or import")
    p.add_argument("--out", required=True, help="PNG")
    p.add_argument("--index", default=None, help="index parquet, to show the source images")
    p.add_argument("--max-rows", type=int, default=6, help="forgeries shown, one per row (default 6)")
    p.add_argument("--tile", type=int, default=256, help="tile height in px")
    p.add_argument("--config", default=None, help="the run's config.yaml: its sources' attributions are drawn on the "
                   "sheet (without it the sheet says that none is declared)")


# Generators whose donors are pasted at the target's face size: the authors' minimum source-face size does not
# apply to them (FORGERIES.md).
NO_MIN_FACE_SIZE = ("random_combination", "paste_random")


def run(args: argparse.Namespace) -> int:
    if args.forge_command == "import":
        from .importer import import_generated

        ledger = Ledger("forge_import")
        df = import_generated(args.root, args.methods or None, split=args.split, ledger=ledger,
                              nonbinary_tolerance=args.nonbinary_tolerance, progress=True)
        write_parquet(args.out, df)
        ledger.write(args.ledger or Path(args.out).with_name("ledger.csv"))
        log.info("imported %d fakes, %d ledger lines", len(df), len(ledger))
        return 0
    if args.forge_command == "sheet":
        from .contact_sheet import contact_sheet

        from ..inputs import read_parquet_arg

        cols = ["image_id", "label", "root", "path", "mask_path", "method", "source_ids"]
        rows = pd.concat([read_parquet_arg(p, "--rows", cols) for p in args.rows], ignore_index=True)
        index = read_parquet_arg(args.index, "--index", ["image_id", "root", "path"]) if args.index else None
        from ..config import load_stage_config

        cfg = load_stage_config(args.config) if args.config else None
        contact_sheet(rows, args.out, index=index, max_rows=args.max_rows, tile=args.tile, cfg=cfg)
        return 0

    from ..config import defaults, load_stage_config
    from ..faces.backends import backend_from_config

    method = args.forge_command
    cfg = load_stage_config(args.config) if args.config else defaults()
    forge_cfg = cfg["forge"]
    options = dict(forge_cfg[method]) if method in forge_cfg else {}
    if args.forehead is not None:
        options["forehead"] = args.forehead
    min_face = args.min_face_size if args.min_face_size is not None else forge_cfg["min_face_size"]
    options["min_face_size"] = 0 if method in NO_MIN_FACE_SIZE else min_face
    shard_size = args.shard_size or cfg["shard_size"]
    from ..inputs import read_parquet_arg

    index = read_parquet_arg(args.index, "--index", ["image_id", "label"])
    seed = args.seed if args.seed is not None else int(cfg["seed"])
    per_real = args.per_real if args.per_real is not None else int(forge_cfg["per_real"])
    forge_shard(index, method, args.shard, int(shard_size), args.out, seed=seed, per_real=per_real,
                options=options, backend=backend_from_config(cfg["faces"]), ledger_path=args.ledger,
                progress=not args.no_progress)
    return 0
