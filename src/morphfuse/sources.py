"""Indexing the inputs: folders of real images, DDL-I-layout datasets and external generators' outputs.

Every source yields manifest rows (columns in :data:`MANIFEST_COLUMNS`). Only file headers are read here (size
and EXIF orientation); stages that decode pixels record bad files in their ledgers.

Folders are walked by :func:`morphfuse.imageio.walk_tree`: symbolic links are followed, but each folder is entered
once and each file listed once (a link loop, a second path to a folder or file, a dangling link is a ledger
line). Images the models cannot analyse are ledgered, not indexed: unreadable headers (with the reason: empty
file, unknown format, over the pixel limit, unsupported TIFF sample format), and images too small or too thin
(config ``images.min_side``, ``images.max_aspect``). Byte-identical files are found by comparing sizes first and
hashing only the files that share a size: copies labelled real and fake are all left out (a ledger line each),
other copies are kept with a ``warning:`` line.
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

import pandas as pd

from .errors import UserError
from .imageio import IMAGE_EXTENSIONS, MAX_ASPECT, MIN_SIDE, BadImageError, header_size, identical_files, \
    is_image_file, unusable_size, walk_tree
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


def _header_size_or_none(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) as viewers show it (EXIF rotation applied), from the header only; None if unreadable."""
    try:
        return header_size(path)
    except BadImageError:
        return None


def _size_or_ledger(path: Path, image_id: str, ledger: Ledger, limits: dict | None = None) -> tuple[int, int] | None:
    """The image's (width, height), or None after a ledger line saying why it cannot be used (an unreadable
    header, with the reason, or too small or thin to analyse)."""
    try:
        size = header_size(path)
    except BadImageError as e:
        ledger.add(image_id, path, e.reason)
        return None
    lim = image_limits(limits)
    why = unusable_size(size[0], size[1], lim["min_side"], lim["max_aspect"])
    if why:
        ledger.add(image_id, path, why)
        return None
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


def _walk_images(root: Path, include: list[str] | None, exclude: list[str] | None,
                 ledger: Ledger | None = None, source: str = "") -> list[str]:
    """Relative paths of the images below ``root`` (each file once; see :func:`walk_tree`); loops, dangling
    links and second paths go to ``ledger``."""
    def selected(rel: str) -> bool:
        if include and not any(fnmatch.fnmatch(rel, pat) for pat in include):
            return False
        return not (exclude and any(fnmatch.fnmatch(rel, pat) for pat in exclude))

    w = walk_tree(root, is_image_file, hidden_dirs=True)
    out = [rel for rel in (p.relative_to(root).as_posix() for p in w.files) if selected(rel)]
    for p, why in w.problems:
        rel = p.relative_to(root).as_posix() if p != root else "."
        if ledger is not None and (not is_image_file(p.name) or selected(rel)):
            ledger.add(image_id_for(source, rel, stem_only=False) if source else rel, p, why)
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


def image_limits(images: dict | None = None) -> dict:
    """The image limits (config ``images``: ``min_side``, ``max_aspect``), defaults filled in."""
    return {"min_side": MIN_SIDE, "max_aspect": MAX_ASPECT, **(images or {})}


def index_folder(src: dict, ledger: Ledger, limits: dict | None = None) -> list[dict]:
    root = Path(src["root"])
    ident = IdentityRule(**(src.get("identity") or {}))
    rels = _walk_images(root, src.get("include"), src.get("exclude"), ledger, src["name"])
    ids = _unique_ids(rels, src["name"])
    rows = []
    for rel in rels:
        size = _size_or_ledger(root / rel, ids[rel], ledger, limits)
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


def index_ddl(src: dict, ledger: Ledger, limits: dict | None = None) -> list[dict]:
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
            rels = [f"{part}/{sub}/{r}" for r in _walk_images(d, None, None, ledger, f"{src['name']}/{part}/{sub}")]
            ids = _unique_ids(rels, src["name"])
            for rel in rels:
                size = _size_or_ledger(root / rel, ids[rel], ledger, limits)
                if size is None:
                    continue
                mask_rel = ""
                if label == 1:
                    m = _find_mask(mask_dirs, Path(rel).stem)
                    if m is None:
                        ledger.add(
                            ids[rel], root / rel, f"fake without a mask (looked in {part}/masks and {part}/mask)"
                        )
                        continue
                    msize = _header_size_or_none(m)
                    if msize != size:
                        ledger.add(ids[rel], m, f"mask is {msize} but its image is {size} (width, height)")
                        continue
                    mask_rel = os.path.relpath(m, root)
                rows.append(_row(ids[rel], root, rel, label, mask_rel, src["name"],
                                 "real" if label == 0 else "ddl", ident(Path(rel).name), split, size))
    test = root / "test"
    if test.is_dir():
        rels = [f"test/{r}" for r in _walk_images(test, None, None, ledger, f"{src['name']}/test")]
        ids = _unique_ids(rels, src["name"])
        for rel in rels:
            size = _size_or_ledger(root / rel, ids[rel], ledger, limits)
            if size is None:
                continue
            rows.append(_row(ids[rel], root, rel, -1, "", src["name"], "unknown", ident(Path(rel).name),
                             "unlabeled", size))
    if not rows:
        raise UserError(
            f"{root}: no images found in DDL-I layout (expected train/ or valid/ with real/, fake/, masks/)"
        )
    return rows


def index_generators(src: dict, ledger: Ledger, limits: dict | None = None) -> list[dict]:
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
        ledger.add(f"{src['name']}__{row['image_id']}" if row["image_id"] else "", row["path"], row["reason"])
    df["image_id"] = src["name"] + "__" + df["image_id"]
    lim = image_limits(limits)
    keep = []
    for r in df.itertuples(index=False):
        why = unusable_size(int(r.width), int(r.height), lim["min_side"], lim["max_aspect"])
        if why:
            ledger.add(r.image_id, Path(r.root) / r.path, why)
        keep.append(why is None)
    df = df[pd.Series(keep, index=df.index, dtype=bool)].reset_index(drop=True)
    df["source_groups"] = df["group"]
    df["fingerprint"] = [file_fingerprint(Path(r) / p, Path(r) / m)
                         for r, p, m in zip(df["root"], df["path"], df["mask_path"])]
    return df.to_dict("records")


def folders_fingerprint(roots) -> str:
    """A hash of the names below the source roots: every folder's path relative to its root and the names in it
    (hidden files left out), nothing else. The workflow passes it to the index rule as a param, so adding, removing
    or renaming an image re-indexes, while a copy of the same tree (a restored backup, ``cp -r``, a data volume
    mounted anew: new modification times, same names) reruns nothing. An image edited in place under the same name
    is not seen: rerun with ``snakemake -R index``. Cheap for millions of files: one ``scandir`` per folder, no
    file is opened or stat'ed. Links are followed, each folder once (a loop is walked once)."""
    import hashlib

    h = hashlib.sha256()
    for root in map(os.fspath, roots):
        if not os.path.isdir(root):
            h.update(f"missing:{root};".encode())
            continue
        seen: set[tuple[int, int]] = set()
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                st = os.stat(d)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                with os.scandir(d) as it:
                    entries = sorted((e.name, _is_dir(e)) for e in it)
            except OSError:
                h.update(f"{os.path.relpath(d, root)}:unreadable;".encode())
                continue
            names = [n + "/" if is_dir else n for n, is_dir in entries if is_dir or not n.startswith(".")]
            h.update(f"{os.path.relpath(d, root)}:{chr(0).join(names)};".encode())
            stack.extend(os.path.join(d, n) for n, is_dir in reversed(entries) if is_dir)
    return h.hexdigest()[:16]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link that cannot be followed is listed as a name
        return False


INDEXERS = {"folder": index_folder, "ddl": index_ddl, "generators": index_generators}


def drop_identical(rows: list[dict], ledger: Ledger) -> list[dict]:
    """Rows whose image files are byte-identical: sizes first, hashes only for files that share a size.

    A file reached twice (overlapping sources) is indexed once. Copies labelled real AND fake contradict each
    other: every labelled copy is left out (one ledger line each).
    Other copies (one label, or unlabeled) are kept, each but the first with a ``warning:`` line: the same image
    twice may sit in two splits.
    """
    first_of: dict[tuple[int, int], int] = {}
    kept = []
    for k, r in enumerate(rows):  # one file reached twice (overlapping sources): indexed once
        p = Path(r["root"]) / r["path"]
        try:
            st = os.stat(p)
        except OSError:
            kept.append(r)
            continue
        key = (st.st_dev, st.st_ino)
        if key in first_of:
            f = rows[first_of[key]]
            ledger.add(r["image_id"], p, f"the same file as {Path(f['root']) / f['path']} (image_id {f['image_id']}; "
                                         "overlapping sources or a link): indexed once")
            continue
        first_of[key] = k
        kept.append(r)
    rows = kept
    paths = [Path(r["root"]) / r["path"] for r in rows]
    names = {-1: "unlabeled", 0: "real", 1: "fake"}
    drop: set[int] = set()
    for group in identical_files(paths):
        group = sorted(group, key=lambda i: rows[i]["image_id"])
        labels = {int(rows[i]["label"]) for i in group}
        contradictory = {0, 1} <= labels
        for i in group:
            lab = int(rows[i]["label"])
            if contradictory and lab in (0, 1):
                o = next(j for j in group if int(rows[j]["label"]) == 1 - lab)
                ledger.add(rows[i]["image_id"], paths[i],
                           f"byte-identical to {paths[o]}, labelled {names[1 - lab]} where this one is "
                           f"{names[lab]}: contradictory labels, every labelled copy left out")
                drop.add(i)
            elif i != group[0]:
                ledger.add(
                    rows[i]["image_id"],
                    paths[i],
                    f"warning: byte-identical copy of {paths[group[0]]} ({names.get(int(rows[group[0]]['label']))}); "
                    "kept, but the same image twice may sit in two splits",
                )
    return [r for k, r in enumerate(rows) if k not in drop]


def index_sources(sources: list[dict], ledger: Ledger, images: dict | None = None) -> pd.DataFrame:
    """Every source's rows; ``images`` holds the image limits (config ``images``, :func:`image_limits`)."""
    rows = []
    for src in sources:
        root = Path(src["root"])
        if not root.is_dir():
            raise UserError(f"source {src['name']!r}: root {root} is not a folder (set sources[].root in the config)")
        rows.extend(INDEXERS[src["kind"]](src, ledger, images))
    rows = drop_identical(rows, ledger)
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise UserError(
            f"image ids are not unique across sources (e.g. {dup.iloc[0]!r}): give the sources distinct names"
        )
    return df
