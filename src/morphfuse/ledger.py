"""The error ledger: one line per input that a stage could not use, written as CSV per stage and shard.

A bad file never stops a run: the stage records ``(stage, image_id, path, reason)`` here and goes on. The
evaluation tables report the counts, so nothing is skipped silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .imageio import write_csv

COLUMNS = ["stage", "image_id", "path", "reason"]


@dataclass
class Ledger:
    stage: str
    rows: list[dict] = field(default_factory=list)

    def add(self, image_id: str, path: str | os.PathLike, reason: str) -> None:
        # One line per entry: a reason never carries a newline into the CSV.
        self.rows.append({"stage": self.stage, "image_id": str(image_id), "path": str(path),
                          "reason": " ".join(str(reason).split())})

    def extend(self, other: "Ledger") -> None:
        self.rows.extend(other.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def write(self, path: str | os.PathLike) -> None:
        """Write the ledger (an empty file with a header when nothing went wrong)."""
        write_csv(path, self.frame())


def read_ledgers(paths) -> pd.DataFrame:
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in paths if Path(p).exists()]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)
