"""Edges that lose nothing (issue 12): `morphfuse detect`'s inputs, its output folder, interruptions, full disks
and bundles, with the real networks at size 64 (the bundle of test_export_detect.py)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import london
from test_edges import ENV, needs_tmpfs, tiny_fs_script
from morphfuse.cli import main
from morphfuse.errors import UserError


def detect(inputs, bundle, out, *extra) -> int:
    return main(["detect", *map(str, inputs), "--models", str(bundle), "--out", str(out), "--no-progress",
                 "--device", "cpu", *extra])


def photos(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in london(start + n)[start:]:
        shutil.copy(src, folder / src.name)
        out.append(folder / src.name)
    return out


def scores_of(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "scores.csv")


def names_in(folder: Path, suffix: str = "") -> set[str]:
    end = f"{suffix}.png"
    return {p.name[: -len(end)] for p in folder.glob(f"*{end}") if not p.name.startswith(".")}


# ------------------------------------------------------------------------------------------ row 3
def test_detect_out_inside_the_input_folder_is_not_walked(bundle, tmp_path):
    """Row 3: with --out inside an input folder, the second run scored its own masks and overlays as photos."""
    src = tmp_path / "in"
    photos(src, 3)
    out = src / "det"
    assert detect([src], bundle, out) == 0
    first = scores_of(out)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    assert detect([src], bundle, out) == 0
    again = scores_of(out)
    assert len(first) == len(again) == 3 and set(again["image"]) == set(first["image"])
    assert {p: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == mtimes  # resumed: nothing redone
    # Another run's output folder inside the inputs is skipped too (it is no photo folder).
    other = tmp_path / "out2"
    assert detect([src], bundle, other) == 0
    assert len(scores_of(other)) == 3


# ------------------------------------------------------------------------------------------ row 4
def test_two_detect_runs_into_one_out_the_second_is_refused(bundle, tmp_path, capsys):
    """Row 4: two runs into one --out both exited normally and one run's scores were gone."""
    src = photos(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(["flock", str(out / ".morphfuse.lock"), "-c", "echo held; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert detect(src, bundle, out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another morphfuse run" in err[0] and str(out) in err[0]
        assert not (out / "scores.csv").exists()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # flock and the shell holding the lock with it
        holder.wait()
    assert detect(src, bundle, out) == 0  # the lock is free again


# ------------------------------------------------------------------------------------------ row 5
def _pages(folder: Path) -> int:
    return sum(math.ceil(p.stat().st_size / 4096) for p in folder.rglob("*") if p.is_file())


@needs_tmpfs
def test_disk_full_detect_one_line_results_kept_and_resumable(bundle, tmp_path):
    """Row 5: a full disk gave a raw OSError traceback: masks written but no scores.csv and no ledger."""
    src = tmp_path / "in"
    photos(src, 3)
    (src / "broken.jpg").write_text("not an image")
    ref = tmp_path / "ref"
    assert detect([src], bundle, ref) == 1
    disk = tmp_path / "disk"
    disk.mkdir()
    size_k = int(_pages(ref) * 4 * 0.6)
    run = (f"{sys.executable} -m morphfuse detect {src} --models {bundle} --out {disk / 'out'} --device cpu "
           f"--no-progress")
    body = (
        f"{run} > {tmp_path / 'log1'} 2>&1; echo $? > {tmp_path / 'rc1'}; cp -a {disk / 'out'} {tmp_path / 'snap1'}; "
        f"mount -o remount,size=64m {disk}; "
        f"{run} > {tmp_path / 'log2'} 2>&1; echo $? > {tmp_path / 'rc2'}; cp -a {disk / 'out'} {tmp_path / 'snap2'}"
    )
    subprocess.run(tiny_fs_script(disk, f"{size_k}k", body), check=True, env=ENV, timeout=900)
    log1 = (tmp_path / "log1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "3", log1
    assert "Traceback" not in log1
    err = [line for line in log1.splitlines() if "error:" in line]
    assert len(err) == 1 and "No space left on device" in err[0] and str(disk / "out") in err[0]
    snap1 = tmp_path / "snap1"
    done = scores_of(snap1)
    assert 1 <= len(done) < 3
    assert "broken" in set(pd.read_csv(snap1 / "ledger.csv")["image_id"])
    assert not [p for p in snap1.rglob("*") if ".tmp" in p.name]  # no partial file
    for sub, suffixes in (("masks", [""]), ("prob", ["_lfdl", "_mitl"]), ("overlays", [""])):
        for p in (snap1 / sub).iterdir():
            Image.open(p).load()  # each file there is complete
    # The rerun (space freed) resumes: the rows already done stay as they were, the others are added.
    assert (tmp_path / "rc2").read_text().strip() == "1", (tmp_path / "log2").read_text()
    final = scores_of(tmp_path / "snap2")
    assert sorted(final["image"]) == sorted(scores_of(ref)["image"])
    pd.testing.assert_frame_equal(final.iloc[: len(done)], done)
    merged = final.merge(scores_of(ref), on="image", suffixes=("", "_ref"))
    assert np.allclose(merged["score"], merged["score_ref"], atol=1e-5)
    assert f"{len(done)} already done" in (tmp_path / "log2").read_text()


# ------------------------------------------------------------------------------------------ row 6
def test_sigterm_during_detect_keeps_results_and_the_rerun_resumes(bundle, tmp_path):
    """Row 6: SIGTERM left no scores.csv and no ledger (written only at the end); a rerun started from zero."""
    src = tmp_path / "in"
    photos(src, 8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "morphfuse", "detect", str(src), "--models", str(bundle), "--out", str(out),
           "--device", "cpu", "--no-progress", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.time()
    while time.time() - t0 < 240 and proc.poll() is None:
        n_masks = len(list((out / "masks").glob("*.png"))) if (out / "masks").is_dir() else 0
        rows = (out / "scores.csv").read_text().count("\n") - 1 if (out / "scores.csv").exists() else 0
        if rows >= 1 or n_masks >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    done = scores_of(out)
    assert 1 <= len(done) < 8
    assert (out / "ledger.csv").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert names_in(out / "masks") == set(done["image"])  # no mask without its score row
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} already done" in r.stderr
    final = scores_of(out)
    assert len(final) == 8 and final["image"].is_unique
    pd.testing.assert_frame_equal(final.iloc[: len(done)], done)


# ------------------------------------------------------------------------------------------ row 7
def test_symlink_loop_file_in_an_input_folder_is_a_ledger_line(bundle, tmp_path):
    """Row 7: a symlink loop file aborted the whole run with RuntimeError before any image."""
    src = tmp_path / "in"
    photos(src, 1)
    os.symlink("loop.jpg", src / "loop.jpg")
    os.symlink(tmp_path / "gone.jpg", src / "dangling.jpg")
    os.symlink(".", src / "self")
    out = tmp_path / "out"
    assert detect([src], bundle, out) == 1
    assert len(scores_of(out)) == 1
    why = dict(zip(pd.read_csv(out / "ledger.csv")["path"].map(lambda p: Path(p).name),
                   pd.read_csv(out / "ledger.csv")["reason"]))
    assert "symbolic link loop" in why["loop.jpg"] and "dangling" in why["dangling.jpg"]
    assert "loop" in why["self"]


# ------------------------------------------------------------------------------------------ row 8
def _bundle_copy(bundle: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in bundle.iterdir():
        if p.suffix == ".pt":
            os.link(p, dest / p.name)
        elif p.is_dir():
            shutil.copytree(p, dest / p.name)
        else:
            shutil.copy(p, dest / p.name)
    return dest


def test_bundle_paths_must_stay_inside_and_types_are_checked(bundle, tmp_path, capsys):
    """Row 8: bundle.json pointing outside the bundle was accepted; wrong field types gave tracebacks."""
    from morphfuse.bundle import load_bundle

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    b = _bundle_copy(bundle, tmp_path / "deep" / "er" / "b")
    os.link(
        b / "lfdl.safetensors", outside / "lfdl.safetensors"
    )  # a real file, the right hash: only the place is wrong
    meta = json.loads((b / "bundle.json").read_text())
    rel = "../../../elsewhere/lfdl.safetensors"
    meta["files"][rel] = meta["files"].pop("lfdl.safetensors")
    meta["models"]["lfdl"]["file"] = rel
    (b / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="outside the bundle"):
        load_bundle(b)
    photo = photos(tmp_path / "in", 1)
    assert detect(photo, b, tmp_path / "o") == 2
    assert "outside the bundle" in capsys.readouterr().err

    good = json.loads((bundle / "bundle.json").read_text())
    for path, value, words in ((["fusion", "kernel"], "five", "fusion.kernel"),
                               (["models", "mitl", "size"], "64", "models.mitl.size"),
                               (["files"], [], "files"),
                               (["crops", "margin"], None, "crops.margin"),
                               (["models", "lfdl", "file"], "/etc/passwd", "models.lfdl.file")):
        meta = json.loads(json.dumps(good))
        node = meta
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        c = tmp_path / f"t_{'_'.join(path)}"
        _bundle_copy(bundle, c)
        (c / "bundle.json").write_text(json.dumps(meta))
        with pytest.raises(UserError) as ei:
            load_bundle(c)
        assert words in str(ei.value) and "\n" not in str(ei.value), str(ei.value)


# ------------------------------------------------------------------------------------------ row 9
def test_tiny_and_thin_images_get_no_verdict(bundle, tmp_path):
    """Row 9: a 1x1 or 20000x20 image was given a verdict (the 1x1 'fake', mask 100 %)."""
    src = tmp_path / "in"
    photos(src, 1)
    Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(src / "dot.png")
    Image.fromarray(np.full((20, 20000, 3), 128, np.uint8)).save(src / "line.png")
    Image.fromarray(np.full((3000, 40, 3), 128, np.uint8)).save(src / "strip.png")  # 40 px wide, 75:1
    out = tmp_path / "out"
    assert detect([src], bundle, out) == 1
    assert len(scores_of(out)) == 1
    why = dict(zip(pd.read_csv(out / "ledger.csv")["image_id"], pd.read_csv(out / "ledger.csv")["reason"]))
    assert "too small to analyse" in why["dot"] and "1x1" in why["dot"] and "32" in why["dot"]
    assert "too thin to analyse" in why["line"] and "too thin to analyse" in why["strip"]
    assert not (out / "masks" / "dot.png").exists()
    # The limits are settings: a smaller minimum lets the 20 px line through (its aspect still refuses it).
    out2 = tmp_path / "out2"
    assert detect([src / "line.png", src / "strip.png"], bundle, out2, "--min-side", "16", "--max-aspect", "100") == 1
    assert set(scores_of(out2)["image"]) == {"strip"}


# ------------------------------------------------------------------------------------------ row 12
def test_rerun_into_an_old_out_leaves_no_stale_masks(bundle, tmp_path, capsys):
    """Row 12: a rerun into an old --out left 1 score row beside 13 stale masks."""
    out = tmp_path / "out"
    first = photos(tmp_path / "a", 3)
    assert detect(first, bundle, out) == 0
    other = photos(tmp_path / "b", 1, start=3)
    assert detect(other, bundle, out) == 0  # same bundle and settings: added to the folder
    rows = scores_of(out)
    assert len(rows) == 4
    for sub, suffix in (("masks", ""), ("overlays", ""), ("prob", "_lfdl"), ("prob", "_mitl")):
        assert names_in(out / sub, suffix) == set(rows["image"]), sub
    # Other settings into the same folder: refused, nothing touched.
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    capsys.readouterr()
    assert detect(other, bundle, out, "--variant", "closing_or") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another run" in err[0] and "--overwrite" in err[0] and "variant" in err[0]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    # --overwrite replaces the old run: only the new image is left.
    assert detect(other, bundle, out, "--variant", "closing_or", "--overwrite") == 0
    rows = scores_of(out)
    assert len(rows) == 1
    for sub, suffix in (("masks", ""), ("overlays", ""), ("prob", "_lfdl"), ("prob", "_mitl")):
        assert names_in(out / sub, suffix) == set(rows["image"]), sub
    # A folder written by an older morphfuse (no run record) is refused as well.
    legacy = tmp_path / "legacy"
    (legacy / "masks").mkdir(parents=True)
    (legacy / "masks" / "x.png").write_bytes(b"")
    (legacy / "scores.csv").write_text("image,path,score\n")
    assert detect(other, bundle, legacy) == 2
    assert detect(other, bundle, legacy, "--overwrite") == 0
    assert not (legacy / "masks" / "x.png").exists()


def test_detect_redoes_a_changed_input_and_keeps_names_apart(bundle, tmp_path):
    """Resume is by path and file stamp: an input replaced in place is analysed again (one row per image), and an
    image from another folder with the same file name gets its own name."""
    out = tmp_path / "out"
    a = photos(tmp_path / "a", 2)
    assert detect(a, bundle, out) == 0
    first = scores_of(out).set_index("image")
    shutil.copy(london(3)[2], a[0])  # same path, other picture
    os.utime(a[0], ns=(10**18, 10**18))  # a clearly new mtime, whatever the clock's resolution
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(london(4)[3], b / a[1].name)  # another file with a[1]'s name
    assert detect([*a, b / a[1].name], bundle, out) == 0
    rows = scores_of(out).set_index("image")
    assert len(rows) == 3 and rows.index.is_unique
    assert rows.loc[a[0].stem, "stamp"] != first.loc[a[0].stem, "stamp"]
    assert rows.loc[a[1].stem, "stamp"] == first.loc[a[1].stem, "stamp"]  # untouched: skipped
    assert rows.loc[f"{a[1].stem}_jpg", "path"] == str(b / a[1].name)
    assert names_in(out / "masks") == set(rows.index)


def test_detector_is_a_function_of_an_image_array(bundle):
    """The core of `Detector.from_bundle(path)(image)` (issue 13): one RGB array in, maps out."""
    from morphfuse.detect import Detector
    from morphfuse.bundle import load_bundle
    from morphfuse.imageio import read_image

    rgb = read_image(london(1)[0])
    r = Detector(load_bundle(bundle))(rgb)
    assert r.n_faces == 1 and 0 <= r.score <= 1 and 0 <= r.mitl_score <= 1
    assert r.mask.shape == r.prob_lfdl.shape == r.prob_mitl.shape == rgb.shape[:2]
    assert r.mask.dtype == bool and r.prob_lfdl_u8.dtype == np.uint8
