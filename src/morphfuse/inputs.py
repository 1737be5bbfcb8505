"""Reading the files a user names on the command line, with one-line errors (:class:`~morphfuse.errors.UserError`
naming the option, the file and what is wrong) instead of library tracebacks.

Each reader accepts a regular file or a pipe (``--ids <(...)``, ``--scores <(...)``): the bytes are read once.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from .errors import UserError


def read_bytes_arg(path: str | os.PathLike, flag: str) -> bytes:
    """The bytes of a file given as ``flag``: a regular file or a pipe; UserError when it cannot be read."""
    p = Path(path)
    label = f"{flag} {p}" if flag else str(p)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise UserError(f"{label}: a dangling symbolic link (its target {os.readlink(p)} does not exist)") from None
        raise UserError(f"{label}: file does not exist") from None
    except OSError as e:
        raise UserError(f"{label}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{label}: is a folder, not a file")
    try:
        with open(p, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{label}: cannot be read ({e.strerror or e})") from None


def read_text_arg(path: str | os.PathLike, flag: str) -> str:
    """The UTF-8 text of a file given as ``flag`` (a regular file or a pipe)."""
    data = read_bytes_arg(path, flag)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag + ' ' if flag else ''}{path}: not a UTF-8 text file") from None


def read_yaml_arg(path: str | os.PathLike, flag: str, mapping: bool = True):
    """A YAML file given as ``flag``; with ``mapping``, it must be a mapping (``key: value``) or empty."""
    import yaml

    text = read_text_arg(path, flag)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{flag + ' ' if flag else ''}{path}: not valid YAML "
                        f"({' '.join(str(e).split())[:200]})") from None
    if data is None:
        return {} if mapping else None
    if mapping and not isinstance(data, dict):
        raise UserError(f"{flag + ' ' if flag else ''}{path}: expected a mapping of settings (key: value), found a "
                        f"{type(data).__name__}")
    return data


def read_parquet_arg(path: str | os.PathLike, flag: str, columns: list[str] | tuple = ()):
    """A Parquet table given as ``flag``, with the ``columns`` it must have."""
    import pandas as pd

    data = read_bytes_arg(path, flag)
    label = f"{flag + ' ' if flag else ''}{path}"
    if not data:
        raise UserError(f"{label}: file is empty (0 bytes), not a Parquet table")
    try:
        df = pd.read_parquet(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any parser failure means the file is not a usable table
        raise UserError(f"{label}: not a readable Parquet table ({' '.join(str(e).split())[:160]})") from None
    return _with_columns(df, columns, label)


def read_csv_arg(path: str | os.PathLike, flag: str, columns: list[str] | tuple = (), **kwargs):
    """A CSV table given as ``flag`` (a file or a pipe), with the ``columns`` it must have."""
    import pandas as pd

    text = read_text_arg(path, flag)
    label = f"{flag + ' ' if flag else ''}{path}"
    if not text.strip():
        raise UserError(f"{label}: file is empty, expected a CSV with the columns {', '.join(columns)}")
    try:
        df = pd.read_csv(io.StringIO(text), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{label}: not a readable CSV ({' '.join(str(e).split())[:160]})") from None
    return _with_columns(df, columns, label, expected=True)


def _with_columns(df, columns, label: str, expected: bool = False):
    """``df`` if it has every one of ``columns``, else a UserError naming the missing ones and those found."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        also = f"; expected {', '.join(columns)}" if expected else ""
        raise UserError(f"{label}: lacks the column(s) {', '.join(missing)}{also} (found: "
                        f"{', '.join(map(str, df.columns))[:200]})")
    return df


def read_ids(path: str | os.PathLike) -> list[str]:
    """One image_id per line (blank lines and ``#`` comments ignored), duplicates removed, order kept. A pipe
    (``--ids <(...)``) works as well as a file."""
    ids = []
    for line in read_text_arg(path, "--ids").splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            ids.append(s)
    return list(dict.fromkeys(ids))
