"""Edges that lose nothing (issue 12), the cases that need no model bundle: folder walks, mask encodings, image
reasons, byte-identical images across labels, fuse's ledger and write errors.

The detect cases (they need a bundle) are in test_edges_detect.py; the CLI fuzz test is test_cli_fuzz.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import f1_score

from conftest import REPO, london
from morphfuse.cli import main

ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))


def _index(tmp_path: Path, sources: list[dict], **extra) -> tuple[int, pd.DataFrame, pd.DataFrame]:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["sources"] = sources
    cfg.update(extra)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    rc = main(["index", "--config", str(p), "--out", str(tmp_path / "i.parquet"), "--ledger", str(tmp_path / "l.csv")])
    df = pd.read_parquet(tmp_path / "i.parquet") if (tmp_path / "i.parquet").exists() else None
    led = pd.read_csv(tmp_path / "l.csv", keep_default_na=False) if (tmp_path / "l.csv").exists() else None
    return rc, df, led


def _photos(folder: Path, rels: list[str]) -> list[Path]:
    out = []
    for rel, src in zip(rels, london(len(rels))):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / rel)
        out.append(folder / rel)
    return out


# ------------------------------------------------------------------------------------------ row 1: walks
@pytest.mark.timeout(120)
def test_folder_source_with_a_symlink_loop_indexes_each_file_once(tmp_path):
    """Row 1: a directory symlink loop in a `folder` source; also a second path to a folder and a dangling link."""
    root = tmp_path / "photos"
    _photos(root, ["p0.jpg", "a/p1.jpg", "a/p2.jpg"])
    os.symlink("..", root / "a" / "back")          # a/back -> photos: a loop
    os.symlink("a", root / "again")                # a second way into a/
    os.symlink(tmp_path / "gone.jpg", root / "dangling.jpg")
    os.symlink("p0.jpg", root / "same.jpg")        # a file link: the same file under another name
    rc, df, led = _index(tmp_path, [{"name": "s", "kind": "folder", "root": str(root)}])
    assert rc == 0
    assert sorted(df["path"]) == ["a/p1.jpg", "a/p2.jpg", "p0.jpg"]  # each file once, under its first path
    assert df["image_id"].is_unique
    reasons = dict(zip(led["path"].map(lambda p: Path(p).name), led["reason"]))
    assert "loop" in reasons["back"] and "already" in reasons["again"]
    assert "dangling" in reasons["dangling.jpg"] and "same file as" in reasons["same.jpg"]


@pytest.mark.timeout(60)
def test_folders_fingerprint_walks_each_folder_once(tmp_path):
    """Row 1 (the folder fingerprint): two links back up the tree made the walk exponential."""
    from morphfuse.sources import folders_fingerprint

    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    os.symlink("..", root / "a" / "up1")
    os.symlink("..", root / "a" / "up2")
    fp = folders_fingerprint([root])
    assert fp == folders_fingerprint([root])
    (root / "a" / "b" / "new.jpg").write_bytes(b"x")  # a new image re-indexes
    assert folders_fingerprint([root]) != fp


def test_folders_fingerprint_follows_names_not_modification_times(tmp_path):
    """A copy of the same tree (new mtimes) re-indexes nothing; an added, removed or renamed image does."""
    from morphfuse.sources import folders_fingerprint

    root = tmp_path / "photos"
    for rel in ("a/1.jpg", "a/2.jpg", "b/c/3.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    fp = folders_fingerprint([root])
    copy = tmp_path / "restored"
    shutil.copytree(root, copy, copy_function=shutil.copyfile)
    for d in (copy, copy / "a", copy / "b", copy / "b" / "c"):
        os.utime(d, (1e9, 1e9))  # a fresh copy: every folder's mtime differs from the original's
    assert os.stat(copy / "a").st_mtime_ns != os.stat(root / "a").st_mtime_ns
    assert folders_fingerprint([copy]) == fp
    (root / "a" / ".DS_Store").write_bytes(b"x")  # hidden files are not images the index would read
    os.utime(root / "b", (2e9, 2e9))
    assert folders_fingerprint([root]) == fp
    changes = [lambda: (root / "a" / "2.jpg").rename(root / "a" / "22.jpg"),
               lambda: (root / "b" / "c" / "3.png").unlink(),
               lambda: (root / "b" / "new.jpg").write_bytes(b"y"),
               lambda: (root / "b").rename(root / "bb")]
    seen = {fp}
    for change in changes:
        change()
        seen.add(folders_fingerprint([root]))
    assert len(seen) == len(changes) + 1
    assert folders_fingerprint([tmp_path / "gone"]) != folders_fingerprint([tmp_path / "gone2"])


# ----------------------------------------------------------------------------------- row 2: 0/1 masks
def _save(path: Path, arr: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def test_ground_truth_stored_as_0_1_is_read_as_binary(tmp_path):
    """Row 2: ground truth coded 0/1 was read as empty (F1 0 counted in the mean)."""
    rng = np.random.default_rng(3)
    split = tmp_path / "valid"
    gts, preds, scores = {}, {}, {}
    for i in range(3):
        h, w = 24, 30 + i
        _save(split / "fake" / f"f{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        gt = np.zeros((h, w), np.uint8)
        gt[4:14, 5:20 + i] = 1
        _save(split / "masks" / f"f{i}.png", gt)  # 0/1, not 0/255
        pred = np.where(gt ^ (rng.random((h, w)) < 0.1), 200, 20).astype(np.uint8)
        _save(tmp_path / "pred" / f"f{i}.png", pred)
        gts[f"f{i}"], preds[f"f{i}"], scores[f"f{i}"] = gt.astype(bool), pred >= 128, 0.9
    _save(split / "real" / "r0.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    _save(tmp_path / "pred" / "r0.png", np.zeros((20, 20), np.uint8))
    scores["r0"] = 0.1
    pd.DataFrame({"image_id": list(scores), "score": list(scores.values())}).to_csv(tmp_path / "s.csv", index=False)
    out = tmp_path / "out"
    rc = main(["evaluate", "--dataset", str(split), "--pred-masks", str(tmp_path / "pred"), "--scores",
               str(tmp_path / "s.csv"), "--out", str(out)])
    assert rc == 0
    import json

    m = json.loads((out / "metrics.json").read_text())
    expected = np.mean([f1_score(gts[k].ravel(), preds[k].ravel()) for k in sorted(gts)])
    assert m["f1"] == pytest.approx(expected) and m["f1"] > 0.5
    led = pd.read_csv(out / "ledger.csv")
    assert len(led) == 1 and led["reason"][0].startswith("note:") and "0 and 1" in led["reason"][0]


def test_probability_maps_stored_as_0_1_are_noted_not_silent(tmp_path, capsys):
    """Row 2 (fuse): 0/1 maps are legal low probabilities (the contract), so the fused masks are empty: said once."""
    rng = np.random.default_rng(4)
    for d in ("lf", "mi"):
        for i in range(3):
            _save(tmp_path / d / f"i{i}.png", (rng.random((16, 16)) < 0.5).astype(np.uint8))
    rc = main(["fuse", "--lfdl-masks", str(tmp_path / "lf"), "--mitl-masks", str(tmp_path / "mi"), "--out",
               str(tmp_path / "out"), "--variant", "mdmf", "--ledger", str(tmp_path / "l.csv")])
    assert rc == 0
    for i in range(3):  # the contract: v = round(255 p), so v = 1 is p = 0.004, below 0.5
        assert not np.asarray(Image.open(tmp_path / "out" / f"i{i}.png")).any()
    led = pd.read_csv(tmp_path / "l.csv")
    assert len(led) == 1 and led["reason"][0].startswith("note:") and "0 and 1" in led["reason"][0]
    assert "0 and 1" in capsys.readouterr().err


def test_mask_encodings(tmp_path):
    """Deliver 2: one reader for binary masks: palette, 16-bit, RGB, 1-bit, 0/1; never a silent all-empty."""
    from morphfuse.imageio import BadImageError, MaskNotes, read_mask

    m = np.zeros((6, 8), bool)
    m[1:4, 2:7] = True
    pal = Image.fromarray(m.astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.save(tmp_path / "pal.png")  # indices 0/1 through a black/white palette
    _save(tmp_path / "u16.png", (m * 65535).astype(np.uint16))
    _save(
        tmp_path / "rgb.png",
        np.dstack([m * 255, np.zeros_like(m, np.uint8), np.zeros_like(m, np.uint8)]).astype(np.uint8),
    )
    Image.fromarray(m).save(tmp_path / "bilevel.png")
    _save(tmp_path / "zero_one.png", m.astype(np.uint8))
    _save(tmp_path / "zero_one_16.png", m.astype(np.uint16))
    _save(tmp_path / "grey.png", (m * 255).astype(np.uint8))
    notes = MaskNotes("ground-truth mask")
    for name in ("pal", "u16", "rgb", "bilevel", "zero_one", "zero_one_16", "grey"):
        got = read_mask(tmp_path / f"{name}.png", notes=notes)
        assert got.dtype == bool and np.array_equal(got, m), name
    assert notes.count == 2  # the two 0/1 files, noted together
    _save(tmp_path / "dim.png", (m * 100).astype(np.uint8))  # nothing above 127 but not empty: refused
    with pytest.raises(BadImageError, match="none above 127"):
        read_mask(tmp_path / "dim.png")
    _save(tmp_path / "alpha.png", np.dstack([np.zeros((6, 8, 3), np.uint8), (m * 255).astype(np.uint8)]))
    with pytest.raises(BadImageError, match="alpha"):
        read_mask(tmp_path / "alpha.png")
    _save(tmp_path / "empty.png", np.zeros((6, 8), np.uint8))
    assert not read_mask(tmp_path / "empty.png").any()  # a truly empty mask is empty


# ------------------------------------------------------------------------------- row 9/10: image reasons
def test_index_ledger_says_what_is_wrong(tmp_path, bad_inputs):
    """Rows 9 and 10: tiny and thin images, a valid float32 RGBA TIFF, a bomb, an empty file, an unknown format."""
    import tifffile

    from morphfuse.imageio import MAX_PIXELS, read_image

    root = tmp_path / "in"
    _photos(root, ["good.jpg"])
    rng = np.random.default_rng(5)
    rgba = rng.random((40, 50, 4)).astype(np.float32)
    tifffile.imwrite(root / "float4.tif", rgba)
    tifffile.imwrite(root / "complex.tif", (rng.random((40, 50)) + 1j).astype(np.complex64))
    shutil.copy(bad_inputs["bomb"], root / "bomb.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "unknown.png").write_bytes(b"GIF87a-ish but not any image format at all" * 10)
    _save(root / "one.png", np.zeros((1, 1, 3), np.uint8))
    _save(root / "thin.png", np.zeros((20, 20000, 3), np.uint8))
    rc, df, led = _index(tmp_path, [{"name": "s", "kind": "folder", "root": str(root)}])
    assert rc == 0
    assert sorted(df["path"]) == ["float4.tif", "good.jpg"]
    row = df.set_index("path").loc["float4.tif"]
    assert (row["width"], row["height"]) == (50, 40)
    assert np.array_equal(read_image(root / "float4.tif"), np.rint(rgba[..., :3] * 255).astype(np.uint8))
    why = dict(zip(led["path"].map(lambda p: Path(p).name), led["reason"]))
    assert set(why) == {"complex.tif", "bomb.png", "empty.jpg", "unknown.png", "one.png", "thin.png"}
    assert "unsupported TIFF sample format" in why["complex.tif"]
    assert "9500x9500" in why["bomb.png"] and str(MAX_PIXELS) in why["bomb.png"]
    assert str(2 * MAX_PIXELS) not in why["bomb.png"] and why["bomb.png"].count("limit") == 1
    assert "empty" in why["empty.jpg"] and "unknown" in why["unknown.png"]
    assert "too small to analyse" in why["one.png"] and "1x1" in why["one.png"]
    assert "too thin to analyse" in why["thin.png"]


# ------------------------------------------------------------------------- row 11: byte-identical copies
def test_byte_identical_image_in_real_and_fake_is_flagged(tmp_path, capsys):
    """Row 11: the same bytes in real/ and fake/ were evaluated as both, with no warning."""
    rng = np.random.default_rng(6)
    split = tmp_path / "valid"
    img = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    _save(split / "real" / "r0.png", img)
    _save(split / "real" / "r1.png", rng.integers(0, 256, (24, 30, 3), dtype=np.uint8))
    _save(split / "fake" / "f1.png", rng.integers(0, 256, (24, 30, 3), dtype=np.uint8))
    shutil.copy(split / "real" / "r0.png", split / "fake" / "f0.png")
    _save(split / "fake" / "f2.png", img[:, :29])  # not the same size: never hashed
    for k in ("f0", "f1", "f2"):
        w = 29 if k == "f2" else 30
        gt = np.zeros((24, w), np.uint8)
        gt[2:9, 3:12] = 255
        _save(split / "masks" / f"{k}.png", gt)
    for k in ("r0", "r1", "f0", "f1", "f2"):
        _save(tmp_path / "pred" / f"{k}.png", np.full((24, 29 if k == "f2" else 30), 200, np.uint8))
    pd.DataFrame({"image_id": ["r0", "r1", "f0", "f1", "f2"], "score": [0.1, 0.2, 0.9, 0.8, 0.7]}).to_csv(
        tmp_path / "s.csv", index=False)
    out = tmp_path / "out"
    rc = main(["evaluate", "--dataset", str(split), "--pred-masks", str(tmp_path / "pred"), "--scores",
               str(tmp_path / "s.csv"), "--out", str(out)])
    assert rc == 1
    df = pd.read_parquet(out / "per_image.parquet").set_index("image_id")
    assert not df.loc["r0", "ok"] and not df.loc["f0", "ok"]
    assert df.loc[["r1", "f1", "f2"], "ok"].all()
    assert "byte-identical" in df.loc["r0", "error"] and "byte-identical" in df.loc["f0", "error"]
    led = pd.read_csv(out / "ledger.csv")
    assert sorted(led["image_id"]) == ["f0", "r0"]

    # The index (DDL-I layout): both copies left out, one ledger line each.
    root = tmp_path / "ddl"
    for sub in ("real", "fake", "masks"):
        (root / "train" / sub).mkdir(parents=True)
    photos = london(3)
    shutil.copy(photos[0], root / "train/real/a.jpg")
    shutil.copy(photos[0], root / "train/fake/b.jpg")
    shutil.copy(photos[1], root / "train/real/c.jpg")
    shutil.copy(photos[2], root / "train/fake/d.jpg")
    for k in ("b", "d"):
        w, h = Image.open(root / f"train/fake/{k}.jpg").size
        gt = np.zeros((h, w), np.uint8)
        gt[10:100, 10:100] = 255
        _save(root / f"train/masks/{k}.png", gt)
    rc, idx, led = _index(tmp_path, [{"name": "d", "kind": "ddl", "root": str(root)}])
    assert rc == 0
    assert sorted(idx["path"]) == ["train/fake/d.jpg", "train/real/c.jpg"]
    assert sorted(Path(p).name for p in led["path"]) == ["a.jpg", "b.jpg"]
    assert all("byte-identical" in r for r in led["reason"])


# ------------------------------------------------------------------------------ row 5: a full disk (fuse)
def _have_userns_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"], capture_output=True)
    return r.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _have_userns_mount(), reason="needs unshare --user --mount to mount a tiny tmpfs")


def tiny_fs_script(mount: Path, size: str, body: str) -> list[str]:
    """A shell command running ``body`` with a real tmpfs of ``size`` mounted at ``mount`` (in a private mount
    namespace; gone when the command ends, so ``body`` copies out what the test inspects)."""
    return ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c",
            f"set -u; mount -t tmpfs -o size={size} tmpfs {mount} && {body}"]


@needs_tmpfs
def test_disk_full_during_fuse_one_line_ledger_kept_no_partial_file(tmp_path):
    """Row 5 (fuse): a full disk gave a raw OSError traceback and no ledger."""
    rng = np.random.default_rng(7)
    for i in range(40):
        _save(tmp_path / "lf" / f"i{i:02d}.png", rng.integers(0, 256, (128, 128), dtype=np.uint8))
        _save(tmp_path / "mi" / f"i{i:02d}.png", rng.integers(0, 256, (128, 128), dtype=np.uint8))
    _save(tmp_path / "lf" / "a_alone.png", np.zeros((8, 8), np.uint8))  # a missing partner: first in id order
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = (f"{sys.executable} -m morphfuse fuse --lfdl-masks {tmp_path / 'lf'} --mitl-masks {tmp_path / 'mi'} "
           f"--out {disk / 'out'} --variant lfdl --ledger {tmp_path / 'ledger.csv'} > {tmp_path / 'log'} 2>&1; "
           f"echo $? > {tmp_path / 'rc'}; cp -a {disk / 'out'} {tmp_path / 'snap'}")
    subprocess.run(tiny_fs_script(disk, "96k", cmd), check=True, env=ENV, timeout=120)
    log = (tmp_path / "log").read_text()
    assert (tmp_path / "rc").read_text().strip() == "3", log
    assert "Traceback" not in log
    err = [line for line in log.splitlines() if "error:" in line]
    assert len(err) == 1 and "No space left on device" in err[0] and str(disk / "out") in err[0]
    snap = tmp_path / "snap"
    written = sorted(p.name for p in snap.iterdir() if not p.name.startswith("."))
    assert 0 < len(written) < 40
    assert not [p for p in snap.iterdir() if ".tmp" in p.name]  # no temporary left behind
    for name in written:  # every mask that is there is complete
        assert np.asarray(Image.open(snap / name)).shape == (128, 128)
    led = pd.read_csv(tmp_path / "ledger.csv")
    assert "a_alone" in set(led["image_id"])  # written as it was found, before the disk filled


# ------------------------------------------------------------------------ deliver 4: write errors (real fs)
def _fuse_inputs(tmp_path: Path, n: int = 3) -> None:
    rng = np.random.default_rng(8)
    for d in ("lf", "mi"):
        for i in range(n):
            _save(tmp_path / d / f"i{i}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))


@needs_tmpfs
def test_read_only_output_one_line_exit_3(tmp_path):
    """A read-only file system (a real tmpfs, remounted read-only): one line naming the path and the cause."""
    _fuse_inputs(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = (f"mkdir {disk / 'out'} && mount -o remount,ro {disk} && {sys.executable} -m morphfuse fuse --lfdl-masks "
           f"{tmp_path / 'lf'} --mitl-masks {tmp_path / 'mi'} --out {disk / 'out'} --variant mdmf "
           f"> {tmp_path / 'log'} 2>&1; echo $? > {tmp_path / 'rc'}")
    subprocess.run(tiny_fs_script(disk, "1m", cmd), check=True, env=ENV, timeout=120)
    log = (tmp_path / "log").read_text()
    assert (tmp_path / "rc").read_text().strip() == "3", log
    err = [line for line in log.splitlines() if "error:" in line]
    assert len(err) == 1 and "Read-only file system" in err[0] and str(disk / "out") in err[0], log
    assert "Traceback" not in log


def test_permission_denied_output_one_line_exit_3(tmp_path):
    """No permission to write: one line, exit 3 (as a user without the right; root is given up for it)."""
    _fuse_inputs(tmp_path)
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    args = ["-m", "morphfuse", "fuse", "--lfdl-masks", str(tmp_path / "lf"), "--mitl-masks", str(tmp_path / "mi"),
            "--out", str(out / "sub"), "--variant", "mdmf"]
    if os.geteuid() == 0:  # root ignores permissions: run as nobody, on world-readable copies
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: cannot drop the privileges that ignore permissions")
        pub = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True).stdout.strip())
        try:
            shutil.copytree(tmp_path / "lf", pub / "lf")
            shutil.copytree(tmp_path / "mi", pub / "mi")
            (pub / "locked").mkdir()
            for p in [pub, *pub.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
            (pub / "locked").chmod(0o555)
            args = [a.replace(str(tmp_path), str(pub)) for a in args]
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, *args],
                               capture_output=True, text=True, env=dict(ENV, HOME=str(pub)), timeout=120, cwd=pub)
        finally:
            shutil.rmtree(pub, ignore_errors=True)
    else:
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 3, r.stderr
    err = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and "Permission denied" in err[0] and "locked/sub" in err[0], r.stderr


def test_append_log_never_leaves_half_a_line(tmp_path, monkeypatch):
    """A short write (what a filling disk does) is cut back: the file holds whole lines only, and the error is an
    OutputError naming the file. The short write is made by the OS call the log uses."""
    from morphfuse.errors import OutputError
    from morphfuse.imageio import AppendLog, read_complete_lines

    log = AppendLog(tmp_path / "s.csv", header="a,b")
    log.append("1,2")
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:3]))
    with pytest.raises(OutputError, match=r"s\.csv: No space left on device"):
        log.append("3,4444444")
    monkeypatch.setattr(os, "write", real_write)
    log.append("5,6")
    log.close()
    assert (tmp_path / "s.csv").read_text() == "a,b\n1,2\n5,6\n"
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4")  # a line cut by a crash is not read
    assert read_complete_lines(tmp_path / "t.csv") == "a,b\n1,2\n"


def test_commit_files_all_or_nothing(tmp_path):
    from morphfuse.errors import OutputError
    from morphfuse.outdir import commit_files

    for n in ("a.txt", "b.txt"):
        (tmp_path / n).write_text("old")

    def full(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="b.txt: No space left"):
        commit_files([(tmp_path / "a.txt", lambda t: Path(t).write_text("new")), (tmp_path / "b.txt", full)])
    assert [(p.name, p.read_text()) for p in sorted(tmp_path.iterdir())] == [("a.txt", "old"), ("b.txt", "old")]
    commit_files([(tmp_path / "a.txt", lambda t: Path(t).write_text("new")),
                  (tmp_path / "b.txt", lambda t: Path(t).write_text("new"))])
    assert [p.read_text() for p in sorted(tmp_path.iterdir())] == ["new", "new"]


# ------------------------------------------------------------------------ deliver 3: fuse and evaluate folders
def test_fuse_out_is_locked_resumes_and_never_mixes(tmp_path, capsys):
    _fuse_inputs(tmp_path, 4)
    out = tmp_path / "out"
    base = ["fuse", "--lfdl-masks", str(tmp_path / "lf"), "--mitl-masks", str(tmp_path / "mi"), "--out", str(out)]
    assert main(base + ["--variant", "mdmf"]) == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert main(base + ["--variant", "mdmf"]) == 0  # resumed: nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    assert "4 mask(s) already done" in capsys.readouterr().err
    _save(tmp_path / "lf" / "i2.png", np.zeros((32, 32), np.uint8))  # a changed input is fused again
    assert main(base + ["--variant", "mdmf"]) == 0
    assert {n for n, t in mtimes.items() if (out / n).stat().st_mtime_ns != t} == {"i2.png"}
    assert main(base + ["--variant", "naive_or"]) == 2  # another run's masks: refused
    assert main(base + ["--variant", "naive_or", "--overwrite"]) == 0
    assert main(base[:-2] + ["--out", str(tmp_path / "lf"), "--variant", "mdmf"]) == 2  # would replace its inputs
    holder = subprocess.Popen(["flock", str(out / ".morphfuse.lock"), "-c", "echo held; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(base + ["--variant", "naive_or"]) == 2
        assert "in use by another morphfuse run" in capsys.readouterr().err
    finally:
        import signal

        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def test_evaluate_out_refuses_another_evaluation(tmp_path, capsys):
    rng = np.random.default_rng(9)
    split = tmp_path / "valid"
    for k in ("r0", "r1"):
        _save(split / "real" / f"{k}.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
        _save(tmp_path / "pred" / f"{k}.png", np.zeros((20, 20), np.uint8))
    pd.DataFrame({"image_id": ["r0", "r1"], "score": [0.1, 0.2]}).to_csv(tmp_path / "s.csv", index=False)
    out = tmp_path / "out"
    ev = ["evaluate", "--dataset", str(split), "--pred-masks", str(tmp_path / "pred"), "--scores",
          str(tmp_path / "s.csv"), "--out", str(out)]
    assert main(ev) == 0
    assert main(ev) == 0  # the same evaluation: rewritten
    before = (out / "metrics.json").read_text()
    assert main(ev + ["--images", "all"]) == 2  # another convention: refused, untouched
    assert "another run" in capsys.readouterr().err and (out / "metrics.json").read_text() == before
    assert main(ev + ["--images", "all", "--overwrite"]) == 0
    assert '"images": "all"' in (out / "metrics.json").read_text()


# --------------------------------------------------------------------------------------- walker details
def test_walk_tree_details(tmp_path):
    from morphfuse.imageio import walk_images, walk_tree

    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / ".hid").mkdir()
    for rel in ("z.jpg", "a.png", "b/x.jpg", "b/c/y.jpg", ".hid/h.jpg", "notes.txt", ".dot.jpg"):
        (tmp_path / rel).write_bytes(b"x")
    os.link(tmp_path / "a.png", tmp_path / "b" / "hard.png")  # a hard link is the same file too
    os.mkfifo(tmp_path / "pipe.jpg")
    problems = []
    files = [p.relative_to(tmp_path).as_posix() for p in walk_images(tmp_path, problems)]
    assert files == ["a.png", "z.jpg", "b/x.jpg", "b/c/y.jpg"]  # os.walk's order; hidden left out
    why = {Path(p).name: r for p, r in problems}
    assert "same file as" in why["hard.png"] and "not a regular file" in why["pipe.jpg"]
    w = walk_tree(tmp_path, hidden_dirs=True, files=False, skip_dir=lambda d: "skip" if d.name == "c" else None)
    assert [d.relative_to(tmp_path).as_posix() for d in w.dirs] == [".", ".hid", "b"]
    assert [d.name for d, _ in w.skipped] == ["c"]


# ------------------------------------------------------------------------ deliver 8: detect's memory pieces
def test_pixel_batches_put_a_huge_image_alone():
    from morphfuse.detect import pixel_batches

    px = {"a": 10, "b": 10, "huge": 9400 * 9400, "c": 5, "d": 5, "e": 5}
    got = list(pixel_batches(((k, v) for k, v in px.items()), budget=25, max_images=8))
    assert got == [["a", "b"], ["huge"], ["c", "d", "e"]]
    assert list(pixel_batches(((k, 1) for k in "abcde"), budget=100, max_images=2)) == [["a", "b"], ["c", "d"], ["e"]]


def test_prob_to_uint8_chunked_is_the_contract_exactly():
    from morphfuse.imageio import prob_to_uint8

    rng = np.random.default_rng(10)
    p = rng.random((301, 257)).astype(np.float32)
    p.flat[:512] = (np.arange(512) % 256 + 0.5) / 255  # exact .5 ties of 255 p
    p.flat[512:520] = [-0.2, 1.3, 0, 1, np.float32(0.5), 0.4999, 0.50196, 1e-9]
    ref = np.clip(np.rint(p.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(prob_to_uint8(p, chunk=1000), ref) and np.array_equal(prob_to_uint8(p), ref)


def test_mask_score_from_the_histogram_matches_the_float_rule():
    from morphfuse.predict import mask_score, mask_score_u8

    rng = np.random.default_rng(11)
    for shape, pct in (((37, 41), 1.0), ((200, 3), 12.5), ((5, 5), 100.0), ((64, 64), 0.01)):
        v = rng.integers(0, 256, shape, dtype=np.uint8)
        assert mask_score_u8(v, "top_percent", pct) == pytest.approx(mask_score(v / 255.0, "top_percent", pct),
                                                                     abs=1e-12)
        assert mask_score_u8(v, "max") == mask_score(v / 255.0, "max")
    assert mask_score_u8(np.zeros((0,), np.uint8)) == 0.0


def test_overlapping_sources_index_each_file_once(tmp_path):
    """The index never holds one file twice, even when two sources reach it."""
    root = tmp_path / "photos"
    _photos(root, ["p0.jpg", "sub/p1.jpg"])
    rc, df, led = _index(tmp_path, [{"name": "all", "kind": "folder", "root": str(root)},
                                    {"name": "part", "kind": "folder", "root": str(root / "sub")}])
    assert rc == 0
    assert sorted(df["image_id"]) == ["all__p0", "all__sub__p1"]
    assert list(led["image_id"]) == ["part__p1"] and "same file as" in led["reason"][0]
