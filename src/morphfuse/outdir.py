"""Output folders that lose nothing: one run at a time, never two runs' outputs mixed, no partial files.

:class:`RunFolder` is used by the stages that write a folder (``detect --out``, ``fuse --out``, ``evaluate --out``):

- a lock (``flock`` on ``OUT/.morphfuse.lock``, released by the kernel when the process ends, even by kill -9)
  refuses a concurrent run into the same folder (exit 2, one line naming the folder and the other process);
- a run record (``OUT/.morphfuse-run.json``: the stage and the settings that decide the outputs) tells a rerun of
  the same command (same settings: it resumes or rewrites) from another run's outputs (other settings, or outputs
  written without a record): those are refused with exit 2 unless ``--overwrite`` is given, which removes them
  first (only the entries the stage writes, never other files);
- temporary files left by a killed atomic write (``.NAME.XXXX.tmp*``) are removed;
- :func:`commit_files` writes a set of files so that either all of them are replaced or none is (each to a
  temporary beside it first; then all are renamed, which needs no space).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from . import __version__
from .errors import OutputError, UserError
from .imageio import atomic_path, write_text_atomic

LOCK_NAME = ".morphfuse.lock"
RECORD_NAME = ".morphfuse-run.json"
RECORD_FORMAT = "morphfuse-run"


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a morphfuse run record (an output folder of detect, fuse or evaluate)."""
    return (Path(path) / RECORD_NAME).is_file()


def _describe_diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for k in keys[:4]:
        a, b = old.get(k), new.get(k)
        if isinstance(a, str) and len(a) > 24:
            a, b = f"{a[:12]}…", f"{str(b)[:12]}…"
        parts.append(f"{k} {a} there, {b} now")
    return ", ".join(parts) + (", ..." if len(keys) > 4 else "")


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp" in name


class RunFolder:
    """An output folder owned by one run of one stage (see the module docstring). Use as a context manager.

    ``owned``: names (or glob patterns) of the entries the stage writes in the folder; ``settings``: what decides
    them (JSON-able). After ``__enter__``, ``resumed`` says whether the folder already held this run's outputs.
    """

    def __init__(self, path: str | os.PathLike, stage: str, settings: dict, owned: Iterable[str],
                 overwrite: bool = False, flag: str = "--out"):
        self.path = Path(path)
        self.stage, self.settings, self.owned = stage, settings, list(owned)
        self.overwrite, self.flag = overwrite, flag
        self.fd: int | None = None
        self.resumed = False
        self.created = False

    # -------------------------------------------------------------------------------------------- entering
    def __enter__(self) -> "RunFolder":
        p = self.path
        if p.exists() and not p.is_dir():
            raise UserError(f"{self.flag} {p}: exists and is not a folder")
        try:
            self.created = not p.exists()
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(p, e) from None
        self._lock()
        try:
            self._check()
        except BaseException:
            self._unlock()
            raise
        return self

    def _lock(self) -> None:
        lock = self.path / LOCK_NAME
        try:
            self.fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(lock, e) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip() or "a process"
            except OSError:
                who = "a process"
            os.close(self.fd)
            self.fd = None
            raise UserError(f"{self.flag} {self.path} is in use by another morphfuse run ({who}): wait for it to "
                            f"finish or choose another {self.flag}") from None
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {os.uname().nodename}, since "
                               f"{_dt.datetime.now().isoformat(timespec='seconds')}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without its description (e.g. a full disk)

    def _unlock(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def present(self) -> list[Path]:
        """The owned entries that exist now."""
        out: list[Path] = []
        for pat in self.owned:
            if any(c in pat for c in "*?["):
                out.extend(sorted(q for q in self.path.glob(pat) if not q.name.startswith(".")))
            elif (self.path / pat).exists() or (self.path / pat).is_symlink():
                out.append(self.path / pat)
        return out

    def _check(self) -> None:
        rec_path = self.path / RECORD_NAME
        record = None
        if rec_path.is_file():
            try:
                record = json.loads(rec_path.read_text())
            except (OSError, ValueError):
                record = {}
        present = self.present()
        if record is not None:
            same = record.get("stage") == self.stage and record.get("settings") == self.settings
            if same:
                self.resumed = True
                self.clean_temporaries()
                return
            if not record:
                why = f"its run record {RECORD_NAME} is unreadable"
            elif record.get("stage") == self.stage:
                why = _describe_diff(record.get("settings") or {}, self.settings)
            else:
                why = f"written by morphfuse {record.get('stage')}"
        elif present:
            why = (f"{', '.join(q.name for q in present[:3])}{', ...' if len(present) > 3 else ''} written "
                   "without a run record (another program, or an older morphfuse)")
        else:
            self._write_record()
            self.clean_temporaries()
            return
        if not self.overwrite:
            raise UserError(f"{self.flag} {self.path} holds the outputs of another run ({why}); not mixing them: "
                            f"choose another {self.flag}, or add --overwrite to replace them")
        self.remove_outputs()
        self._write_record()
        self.clean_temporaries()

    def _write_record(self) -> None:
        rec = {"format": RECORD_FORMAT, "stage": self.stage, "settings": self.settings,
               "morphfuse_version": __version__,
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        write_text_atomic(self.path / RECORD_NAME, json.dumps(rec, indent=2, sort_keys=True) + "\n")

    def remove_outputs(self) -> None:
        """Remove the owned entries (``--overwrite``) and the run record."""
        try:
            for q in self.present():
                if q.is_dir() and not q.is_symlink():
                    shutil.rmtree(q)
                else:
                    q.unlink()
            (self.path / RECORD_NAME).unlink(missing_ok=True)
        except OSError as e:
            raise OutputError(getattr(e, "filename", None) or self.path, e) from None

    def clean_temporaries(self) -> None:
        """Remove the temporary files of atomic writes that a killed run left (in the folder and its owned
        subfolders)."""
        folders = [self.path] + [q for q in self.present() if q.is_dir()]
        for d in folders:
            try:
                for e in os.scandir(d):
                    if _is_temp(e.name) and e.is_file(follow_symlinks=False):
                        os.unlink(e.path)
            except OSError:
                continue

    # --------------------------------------------------------------------------------------------- leaving
    def __exit__(self, exc_type, exc, tb):
        self._unlock()
        if exc_type is not None and self.created and issubclass(exc_type, UserError):
            # Nothing was made (e.g. no inputs): do not leave an empty folder with only our bookkeeping in it.
            try:
                if {e.name for e in os.scandir(self.path)} <= {LOCK_NAME, RECORD_NAME}:
                    shutil.rmtree(self.path)
            except OSError:
                pass
        return False


def commit_files(writers: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write several files so that all of them are replaced or none is: each ``writer(tmp)`` writes a temporary
    beside its destination; only when every one succeeded are they renamed into place."""
    managers = []
    try:
        for dest, write in writers:
            m = atomic_path(dest)
            tmp = m.__enter__()
            managers.append((m, tmp))
            try:
                write(tmp)
            except BaseException as e:
                m.__exit__(type(e), e, None)  # removes tmp, turns an OS error into OutputError
                managers.pop()
                raise
    except BaseException:
        for _, tmp in managers:
            Path(tmp).unlink(missing_ok=True)
        raise
    for m, _ in managers:
        m.__exit__(None, None, None)  # chmod + rename: no new space needed
