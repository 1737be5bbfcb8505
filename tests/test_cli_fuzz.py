"""No tracebacks for user errors (issue 12, deliver 7): every subcommand over malformed inputs.

Each case runs in-process through ``morphfuse.cli.main`` (a subprocess pays ~2.5 s of imports) and must end with
exit 1 or 2, no traceback, and for exit 2 exactly one ``error:`` line naming what is wrong. A few real subprocess
calls check the same from a shell, with pipes (``--ids <(...)``) and signals' exit statuses.

The malformed inputs, for every input slot of every subcommand: missing, empty (0 bytes), garbage text with the
expected extension, a folder where a file is expected (or a file where a folder is), a pipe of garbage
(``/dev/fd/N``), a dangling symbolic link, a symbolic link loop, and content of the wrong kind (a YAML list for a
config, a Parquet file with other columns, a CSV with other columns, masks of the wrong size).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import REPO, london
from morphfuse.cli import COMMANDS, main

ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))


# --------------------------------------------------------------------------------------- malformed inputs
class Bad:
    """Factory of malformed inputs of each kind, in one folder."""

    FILE_KINDS = ("missing", "empty", "garbage", "folder", "pipe", "dangling", "loop")
    DIR_KINDS = ("missing", "file", "empty_dir", "dangling", "loop")

    def __init__(self, root: Path):
        self.root = root
        self.n = 0
        self.fds: list[int] = []

    def _p(self, ext: str) -> Path:
        self.n += 1
        return self.root / f"in{self.n}{ext}"

    def file(self, kind: str, ext: str) -> str:
        p = self._p(ext)
        if kind == "missing":
            return str(p)
        if kind == "empty":
            p.write_bytes(b"")
        elif kind == "garbage":
            p.write_bytes(b"\x00\xffgarbage, not what was expected\n" * 3)
        elif kind == "folder":
            p.mkdir()
        elif kind == "pipe":
            r, w = os.pipe()
            os.write(w, b"garbage,through,a pipe\n\x00\xff\n")
            os.close(w)
            self.fds.append(r)
            return f"/dev/fd/{r}"
        elif kind == "dangling":
            os.symlink(self.root / "nowhere", p)
        elif kind == "loop":
            os.symlink(p.name, p)
        else:
            raise ValueError(kind)
        return str(p)

    def folder(self, kind: str) -> str:
        p = self._p("")
        if kind == "missing":
            return str(p)
        if kind == "file":
            p.write_text("a file, not a folder\n")
        elif kind == "empty_dir":
            p.mkdir()
        elif kind == "dangling":
            os.symlink(self.root / "nowhere", p)
        elif kind == "loop":
            os.symlink(p.name, p)
        return str(p)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _wrong_kind(root: Path) -> dict[str, str]:
    """Well-formed files of the wrong content."""
    out = {}
    (root / "list.yaml").write_text("- just\n- a list\n")
    out["yaml"] = str(root / "list.yaml")
    (root / "broken.yaml").write_text("sources: [\n")
    out["yaml2"] = str(root / "broken.yaml")
    pd.DataFrame({"x": [1, 2]}).to_parquet(root / "other.parquet")
    out["parquet"] = str(root / "other.parquet")
    (root / "other.csv").write_text("a,b\n1,2\n")
    out["csv"] = str(root / "other.csv")
    np.savez(root / "other.npz", x=np.zeros(3))
    out["npz"] = str(root / "other.npz")
    (root / "text.pt").write_text("not a torch file")
    out["pt"] = str(root / "text.pt")
    (root / "bundle").mkdir()
    (root / "bundle" / "bundle.json").write_text('{"format": "morphfuse-bundle", "format_version": 1}')
    out["bundle"] = str(root / "bundle")
    masks = root / "wrongsize"
    masks.mkdir()
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(masks / "a.png")
    out["masks"] = str(masks)
    return out


# ------------------------------------------------------------------------------- the subcommands' slots
# Per subcommand: its arguments with {slots}. A slot named f_<ext> takes a file, d_<name> a folder; every other
# slot keeps a plausible default. o_ slots are outputs (a fresh path).
SLOT = re.compile(r"\{([fdo]_[\w.]+)\}")
SPECS: dict[str, list[str]] = {
    "index": ["--config", "{f_yaml}", "--out", "{o_i.parquet}", "--ledger", "{o_l.csv}"],
    "forge": [
        "sbi",
        "--index",
        "{f_parquet}",
        "--shard",
        "0",
        "--shard-size",
        "4",
        "--out",
        "{o_forge}",
        "--config",
        "{f_yaml}",
    ],
    "forge import": ["import", "--root", "{d_root}", "--out", "{o_rows.parquet}"],
    "forge sheet": ["sheet", "--rows", "{f_parquet}", "--out", "{o_sheet.png}"],
    "manifest": ["--index", "{f_parquet}", "--forged", "{f_parquet2}", "--shard-size", "4", "--out-dir", "{o_man}"],
    "faces": ["--manifest", "{f_parquet}", "--out", "{o_f.parquet}", "--ledger", "{o_fl.csv}", "--no-progress"],
    "crops": ["--manifest", "{f_parquet}", "--faces", "{f_parquet2}", "--out", "{o_c.parquet}"],
    "features": [
        "--manifest",
        "{f_parquet}",
        "--crops",
        "{f_parquet2}",
        "--out-lfdl",
        "{o_l.npz}",
        "--ledger",
        "{o_fl.csv}",
        "--lfdl-size",
        "64",
    ],
    "info": ["lfdl", "--config", "{f_yaml}"],
    "train": ["lfdl", "--config", "{f_yaml}", "--features", "{f_npz}", "--out", "{o_train}", "--no-progress"],
    "predict": [
        "lfdl",
        "--model",
        "{f_pt}",
        "--features",
        "{f_npz}",
        "--manifest",
        "{f_parquet}",
        "--out",
        "{o_pred}",
        "--no-progress",
    ],
    "predictions-from-files": [
        "--manifest",
        "{f_parquet}",
        "--masks",
        "{d_masks}",
        "--scores",
        "{f_csv}",
        "--out",
        "{o_pff}",
    ],
    "fuse": [
        "--lfdl-masks",
        "{d_masks}",
        "--mitl-masks",
        "{d_masks2}",
        "--out",
        "{o_fuse}",
        "--variant",
        "mdmf",
        "--ids",
        "{f_txt}",
    ],
    "evaluate": ["--dataset", "{d_dataset}", "--pred-masks", "{d_masks}", "--scores", "{f_csv}", "--out", "{o_ev}"],
    "evaluate manifest": [
        "--manifest",
        "{f_parquet}",
        "--pred-masks",
        "{d_masks}",
        "--scores",
        "{f_csv}",
        "--out-counts",
        "{o_c.parquet}",
    ],
    "evaluate baseline": [
        "--manifest",
        "{f_parquet}",
        "--baseline",
        "face",
        "--crops",
        "{f_parquet2}",
        "--out-counts",
        "{o_c.parquet}",
    ],
    "tables": ["--counts", "{f_parquet}", "--out", "{o_tables}", "--no-figures", "--bootstrap", "5"],
    "thresholds": ["--manifest", "{f_parquet}", "--lfdl", "{d_masks}", "--mitl", "{d_masks2}", "--out", "{o_t.json}"],
    "report": ["--run-dir", "{d_run}", "--config", "{f_yaml}", "--out", "{o_report}"],
    "provenance": ["--config", "{f_yaml}", "--out", "{o_p.json}"],
    "export": ["--lfdl", "{f_pt}", "--mitl", "{f_pt2}", "--config", "{f_yaml}", "--out", "{o_bundle}", "--no-check"],
    "detect": ["{f_jpg}", "--models", "{d_bundle}", "--out", "{o_det}", "--no-progress", "--device", "cpu"],
    "config": ["--config", "{f_yaml}", "--out", "{o_eff.yaml}"],
    "perturb": [
        "--manifest",
        "{f_parquet}",
        "--perturb",
        "jpeg:70",
        "--images",
        "{o_pimg}",
        "--out",
        "{o_p.parquet}",
        "--ledger",
        "{o_pl.csv}",
    ],
    "robustness": ["--ablation", "none={f_csv}", "--out", "{o_rob}"],
    "robust-predict": [
        "--manifest",
        "{f_parquet}",
        "--perturb",
        "jpeg:70",
        "--config",
        "{f_yaml}",
        "--lfdl-model",
        "{f_pt}",
        "--mitl-model",
        "{f_pt2}",
        "--work",
        "{o_work}",
        "--out-lfdl",
        "{o_rl}",
        "--out-mitl",
        "{o_rm}",
        "--crops-out",
        "{o_rc.parquet}",
        "--ledger",
        "{o_rl.csv}",
    ],
    "robust-evaluate": [
        "--manifest",
        "{f_parquet}",
        "--config",
        "{f_yaml}",
        "--lfdl",
        "{d_run}",
        "--mitl",
        "{d_run}",
        "--crops",
        "{f_parquet2}",
        "--fused",
        "{o_fused}",
        "--counts",
        "{o_counts}",
        "--ledgers",
        "{o_led}",
    ],
    "weights": ["check", "--config", "{f_yaml}"],
    "bulk": ["list", "--root", "{d_root}", "--out", "{o_bulk}"],
}
WRONG = {"yaml": "yaml", "parquet": "parquet", "parquet2": "parquet", "csv": "csv", "npz": "npz", "pt": "pt",
         "pt2": "pt", "bundle": "bundle", "masks": "masks", "masks2": "masks"}


@pytest.fixture(scope="module")
def env(tmp_path_factory, bundle):  # noqa: F811
    root = tmp_path_factory.mktemp("fuzz")
    good = root / "good"
    good.mkdir()
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["results_dir"] = str(root / "results")
    cfg["sources"][0]["root"] = str(root / "nowhere")
    (good / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copy(london(1)[0], good / "photo.jpg")
    (good / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good / "masks" / "a.png")
    (good / "ids.txt").write_text("a\n")
    wrong = _wrong_kind(root)
    wrong["good_bundle"] = str(bundle)
    return root, good, wrong


def _defaults(good: Path, wrong: dict) -> dict[str, str]:
    return {"yaml": str(good / "config.yaml"), "parquet": wrong["parquet"], "parquet2": wrong["parquet"],
            "csv": wrong["csv"], "npz": wrong["npz"], "pt": wrong["pt"], "pt2": wrong["pt"],
            "txt": str(good / "ids.txt"), "jpg": str(good / "photo.jpg"), "masks": str(good / "masks"),
            "masks2": str(good / "masks"), "dataset": str(good), "root": str(good), "run": str(good),
            "bundle": wrong["good_bundle"]}


def cases() -> list[tuple[str, str, str]]:
    """(subcommand spec, slot, malformed kind) for every input slot."""
    out = []
    for spec, argv in SPECS.items():
        slots = [m for a in argv for m in SLOT.findall(a) if not m.startswith("o_")]
        for slot in slots:
            kinds = list(Bad.FILE_KINDS if slot.startswith("f_") else Bad.DIR_KINDS)
            if slot[2:] in WRONG:
                kinds.append("wrong")
            if slot == "f_yaml":
                kinds.append("wrong2")
            out.extend((spec, slot, k) for k in kinds)
    return out


CASES = cases()


def _argv(spec, slot, kind, root: Path, good: Path, wrong: dict, bad: Bad, case_dir: Path) -> list[str]:
    name = spec.split()[0]
    defaults = _defaults(good, wrong)
    argv = [name]
    def value(s: str) -> str:
        if s.startswith("o_"):
            return str(case_dir / s[2:])
        if s != slot:
            return defaults[s[2:]]
        if kind == "wrong":
            return wrong[WRONG[s[2:]]]
        if kind == "wrong2":
            return wrong["yaml2"]
        if s.startswith("f_"):
            return bad.file(kind, "." + s[2:].rstrip("0123456789"))
        return bad.folder(kind)

    for a in SPECS[spec]:
        argv.append(SLOT.sub(lambda m: value(m.group(1)), a))  # a slot may sit inside an argument (ID={f_csv})
    return argv


def check_one_line(rc: int, err: str, what: str) -> None:
    assert "Traceback" not in err, f"{what}: traceback\n{err[-3000:]}"
    assert rc in (1, 2), f"{what}: exit {rc}\n{err[-2000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    if rc == 2:
        errors = [line for line in lines if " error: " in line or line.startswith("error:")]
        assert len(errors) == 1, f"{what}: expected one error line, got {errors}\n{err[-2000:]}"
    else:
        assert lines, f"{what}: exit 1 without a word"


@pytest.mark.timeout(900)
def test_every_subcommand_over_malformed_inputs(env, tmp_path, capsys):
    root, good, wrong = env
    bad = Bad(tmp_path)
    failures = []
    try:
        for i, (spec, slot, kind) in enumerate(CASES):
            case_dir = tmp_path / f"case{i}"
            case_dir.mkdir()
            argv = _argv(spec, slot, kind, root, good, wrong, bad, case_dir)
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 2
            except Exception as e:  # noqa: BLE001 - a traceback the user would see
                import traceback

                frame = traceback.extract_tb(e.__traceback__)[-1]
                capsys.readouterr()
                failures.append(f"{spec} {slot}={kind}: traceback {type(e).__name__}: {str(e)[:200]} "
                                f"(at {Path(frame.filename).name}:{frame.lineno})")
                continue
            err = capsys.readouterr().err
            try:
                check_one_line(rc, err, f"{spec} {slot}={kind}: {' '.join(argv)}")
            except AssertionError as e:
                failures.append(str(e)[:600])
    finally:
        bad.close()
    print(f"\n{len(CASES)} malformed-input cases over {len(SPECS)} subcommand forms")
    assert not failures, f"{len(failures)} of {len(CASES)} cases failed:\n\n" + "\n".join(failures)


def test_every_subcommand_is_fuzzed():
    assert {s.split()[0] for s in SPECS} == {c[0] for c in COMMANDS}
    assert len(CASES) >= 150


# ------------------------------------------------------------------------------------ real subprocesses
def _bash(cmd: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)


def test_real_shell_calls_with_pipes_and_bad_paths(tmp_path):
    mf = f"{sys.executable} -m morphfuse"
    for d in ("lf", "mi"):
        (tmp_path / d).mkdir()
        for k in ("a", "b"):
            Image.fromarray(np.full((6, 6), 200, np.uint8)).save(tmp_path / d / f"{k}.png")
    # --ids through a pipe: read, not "file not found"
    r = _bash(f"{mf} fuse --lfdl-masks lf --mitl-masks mi --out out --variant mdmf --ids <(printf 'a\\n')", tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png"]
    # --scores through a pipe, a dataset without real/ or fake/: one line, exit 2
    r = _bash(f"{mf} evaluate --dataset lf --pred-masks mi --scores <(printf 'image_id,score\\na,0.5\\n') "
              "--out ev", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len([x for x in r.stderr.splitlines() if "error:" in x]) == 1 and "real/" in r.stderr
    # a config that is a folder, and one that does not exist
    for arg in ("lf", "missing.yaml"):
        r = _bash(f"{mf} index --config {arg} --out i.parquet", tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len([x for x in r.stderr.splitlines() if "error:" in x]) == 1
    # an empty bundle folder
    (tmp_path / "nob").mkdir()
    r = _bash(f"{mf} detect lf/a.png --models nob --out det --no-progress", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bundle.json" in r.stderr
