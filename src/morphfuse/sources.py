"""Indexing the inputs: folders of real images, DDL-I-layout datasets and external generators' outputs.

Every source yields manifest rows (columns in :data:`MANIFEST_COLUMNS`). Only file headers are read here (size
and EXIF orientation); stages that decode pixels record bad files in their ledgers.
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

import pandas as pd

from .errors import UserError
from .imageio import IMAGE_EXTENSIONS, BadImageError, header_size, is_image_file
from .ledger import Ledger

MANIFEST_COLUMNS = ["image_id", "root", "path", "label", "mask_path", "source", "method", "group",
                    "source_groups", "source_ids", "split", "width", "height", "fingerprint"]
SPLITS = ("train", "val", "test")


def safe_id(text: str) -> str:
    """A file-name-safe id: path separators become ``__``, anything odd becomes ``-``."""
    text = text.replace("\\", "/").strip("/").replace("/", "__")
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", text)


def image_id_for(source: str, relpath: str, stem_only: bool = True) -> str:
    rel = Path(relpath)
    base = str(rel.with_suffix("")) if stem_only else str(rel)
    return safe_id(f"{source}/{base}")


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) as viewers show it (EXIF rotation applied), from the header only; None if unreadable."""
    try:
        return header_size(path)
    except BadImageError:
        return None


def _size_or_ledger(path: Path, image_id: str, ledger: Ledger) -> tuple[int, int] | None:
    """:func:`image_size`, recording an unreadable header in the ledger."""
    size = image_size(path)
    if size is None:
        ledger.add(image_id, path, "unreadable image header (corrupt, truncated or not an image)")
    return size


class IdentityRule:
    """Maps a relative path to the identity (group) of the person shown.

    ``regex``: group 1 of ``pattern`` searched in the relative path, else ``fallback``; ``folder``: the parent
    folder's name; ``file``: every file its own identity (the default, safe when nothing is known).
    """

    def __init__(self, rule: str = "file", pattern: str | None = None, fallback: str = "file"):
        if rule not in ("regex", "folder", "file"):
            raise UserError(f"identity.rule = {rule!r}: must be regex, folder or file")
        self.rule, self.fallback = rule, fallback
        self.pattern = None
        if rule == "regex":
            if not pattern:
                raise UserError("identity.rule = regex needs identity.pattern (a regex whose group 1 is the person)")
            try:
                self.pattern = re.compile(pattern)
            except re.error as e:
                raise UserError(f"identity.pattern = {pattern!r}: not a valid regex ({e})") from None
            if self.pattern.groups < 1:
                raise UserError(f"identity.pattern = {pattern!r}: needs a capture group (the identity)")

    def __call__(self, relpath: str) -> str:
        relpath = relpath.replace("\\", "/")
        if self.rule == "regex":
            m = self.pattern.search(relpath)
            if m:
                return m.group(1)
            return self._simple(self.fallback, relpath)
        return self._simple(self.rule, relpath)

    @staticmethod
    def _simple(rule: str, relpath: str) -> str:
        if rule == "folder":
            parent = str(Path(relpath).parent)
            return parent if parent != "." else relpath
        return relpath


def _walk_images(root: Path, include: list[str] | None, exclude: list[str] | None) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), root).replace("\\", "/")
            if fn.startswith(".") or not is_image_file(fn):
                continue
            if include and not any(fnmatch.fnmatch(rel, pat) for pat in include):
                continue
            if exclude and any(fnmatch.fnmatch(rel, pat) for pat in exclude):
                continue
            out.append(rel)
    return out


def file_fingerprint(*paths: str | os.PathLike) -> str:
    """Size and modification time of the files a row points at.

    Shard files list images by path; this column makes a shard's bytes change when an image it lists changes,
    so Snakemake reruns the shard's stages then (and only then: it skips inputs whose checksum is unchanged).
    """
    parts = []
    for p in paths:
        st = os.stat(p)
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _row(image_id, root, rel, label, mask_rel, source, method, group, split, size) -> dict:
    files = [Path(root) / rel] + ([Path(root) / mask_rel] if mask_rel else [])
    return {"image_id": image_id, "root": str(root), "path": rel, "label": int(label), "mask_path": mask_rel,
            "source": source, "method": method, "group": str(group), "source_groups": str(group),
            "source_ids": "", "split": split, "width": int(size[0]), "height": int(size[1]),
            "fingerprint": file_fingerprint(*files)}


def _unique_ids(rels: list[str], source: str) -> dict[str, str]:
    """image ids from stems, keeping the extension only where two files share a stem."""
    ids = {r: image_id_for(source, r) for r in rels}
    counts: dict[str, int] = {}
    for v in ids.values():
        counts[v] = counts.get(v, 0) + 1
    return {r: (v if counts[v] == 1 else image_id_for(source, r, stem_only=False)) for r, v in ids.items()}


def index_folder(src: dict, ledger: Ledger) -> list[dict]:
    root = Path(src["root"])
    ident = IdentityRule(**(src.get("identity") or {}))
    rels = _walk_images(root, src.get("include"), src.get("exclude"))
    ids = _unique_ids(rels, src["name"])
    rows = []
    for rel in rels:
        size = _size_or_ledger(root / rel, ids[rel], ledger)
        if size is None:
            continue
        rows.append(_row(ids[rel], root, rel, 0, "", src["name"], "real", ident(rel), src.get("split") or "", size))
    return rows


def _find_mask(mask_dirs: list[Path], stem: str) -> Path | None:
    for d in mask_dirs:
        for ext in IMAGE_EXTENSIONS:
            p = d / f"{stem}{ext}"
            if p.exists():
                return p
    return None


def index_ddl(src: dict, ledger: Ledger) -> list[dict]:
    """DDL-I layout: ``{train,valid}/{real,fake,masks|mask}/`` and an unlabeled ``test/``.

    ``train`` → split train, ``valid`` → split val (set ``evaluate.split: val`` to score it), ``test`` →
    split ``unlabeled`` (label -1: prediction only).
    """
    root = Path(src["root"])
    ident = IdentityRule(**(src.get("identity") or {}))
    rows = []
    for part, split in (("train", "train"), ("valid", "val")):
        base = root / part
        if not base.is_dir():
            continue
        mask_dirs = [base / "masks", base / "mask"]
        for label, sub in ((0, "real"), (1, "fake")):
            d = base / sub
            if not d.is_dir():
                continue
            rels = [f"{part}/{sub}/{r}" for r in _walk_images(d, None, None)]
            ids = _unique_ids(rels, src["name"])
            for rel in rels:
                size = _size_or_ledger(root / rel, ids[rel], ledger)
                if size is None:
                    continue
                mask_rel = ""
                if label == 1:
                    m = _find_mask(mask_dirs, Path(rel).stem)
                    if m is None:
                        ledger.add(ids[rel], root / rel, f"fake without a mask (looked in {part}/masks and {part}/mask)")
                        continue
                    msize = image_size(m)
                    if msize != size:
                        ledger.add(ids[rel], m, f"mask is {msize} but its image is {size} (width, height)")
                        continue
                    mask_rel = os.path.relpath(m, root)
                rows.append(_row(ids[rel], root, rel, label, mask_rel, src["name"],
                                 "real" if label == 0 else "ddl", ident(Path(rel).name), split, size))
    test = root / "test"
    if test.is_dir():
        rels = [f"test/{r}" for r in _walk_images(test, None, None)]
        ids = _unique_ids(rels, src["name"])
        for rel in rels:
            size = _size_or_ledger(root / rel, ids[rel], ledger)
            if size is None:
                continue
            rows.append(_row(ids[rel], root, rel, -1, "", src["name"], "unknown", ident(Path(rel).name),
                             "unlabeled", size))
    if not rows:
        raise UserError(f"{root}: no images found in DDL-I layout (expected train/ or valid/ with real/, fake/, masks/)")
    return rows


def index_generators(src: dict, ledger: Ledger) -> list[dict]:
    """External generators' outputs: ``<root>/<method>/{fake,mask|masks}/`` with a mask per fake (same stem).

    The checks (mask present, same size, binary, not empty) are those of ``morphfuse forge import``; the
    identity rule sees ``<method>/<path under fake/>``.
    """
    from .forge.importer import import_generated

    ident = IdentityRule(**(src.get("identity") or {}))
    local = Ledger(ledger.stage)
    df = import_generated(src["root"], src.get("methods"), split=src.get("split") or "",
                          identity=lambda method, rel: ident(f"{method}/{rel}"), ledger=local,
                          source=src["name"])
    for row in local.rows:  # the same ids in the ledger as in the manifest
        ledger.add(f"{src['name']}__{row['image_id']}", row["path"], row["reason"])
    df["image_id"] = src["name"] + "__" + df["image_id"]
    df["source_groups"] = df["group"]
    df["fingerprint"] = [file_fingerprint(Path(r) / p, Path(r) / m)
                         for r, p, m in zip(df["root"], df["path"], df["mask_path"])]
    return df.to_dict("records")


def folders_fingerprint(roots) -> str:
    """A hash of every folder's path and modification time below the source roots (folders only: cheap even for
    millions of files). Adding, removing or renaming an image changes its folder's mtime, so the workflow passes
    this to the index rule as a param and re-indexes then; an image edited in place keeps its folder's mtime (rerun
    with ``snakemake -R index``)."""
    import hashlib

    h = hashlib.sha256()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            h.update(f"missing:{root}".encode())
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            dirnames.sort()
            h.update(f"{os.path.relpath(dirpath, root)}:{os.stat(dirpath).st_mtime_ns};".encode())
    return h.hexdigest()[:16]


INDEXERS = {"folder": index_folder, "ddl": index_ddl, "generators": index_generators}


def index_sources(sources: list[dict], ledger: Ledger) -> pd.DataFrame:
    rows = []
    for src in sources:
        root = Path(src["root"])
        if not root.is_dir():
            raise UserError(f"source {src['name']!r}: root {root} is not a folder (set sources[].root in the config)")
        rows.extend(INDEXERS[src["kind"]](src, ledger))
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise UserError(f"image ids are not unique across sources (e.g. {dup.iloc[0]!r}): give the sources distinct names")
    return df
