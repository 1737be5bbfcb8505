"""The error ledger: one line per input that a stage could not use, written as CSV per stage and shard.

A bad file never stops a run: the stage records ``(stage, image_id, path, reason)`` here and goes on. The
evaluation tables report the counts, so nothing is skipped silently. Lines whose reason starts with ``note:`` or
``warning:`` record something unusual that was still used (e.g. masks stored as 0/1); they do not count as
errors for a stage's exit status (:attr:`Ledger.n_errors`).

A ledger can also be appended to its CSV as each line is added (:meth:`Ledger.stream_to`), so that a run that is
killed or stops on a full disk keeps every line found before.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas is imported where it is used: not on `morphfuse detect`'s path
    import pandas as pd

from .imageio import AppendLog, EncodingNotes, MaskNotes, csv_line, write_text_atomic

COLUMNS = ["stage", "image_id", "path", "reason"]
NOTE_PREFIXES = ("note:", "warning:")


@dataclass
class Ledger:
    stage: str
    rows: list[dict] = field(default_factory=list)
    _sink: AppendLog | None = field(default=None, repr=False, compare=False)
    _mask_notes: EncodingNotes | None = field(default=None, repr=False, compare=False)

    @property
    def mask_notes(self) -> EncodingNotes:
        """Notes of ground-truth masks stored as 0/1 (``imageio.read_mask(..., notes=ledger.mask_notes)``),
        written as one ``note:`` line by :meth:`write`."""
        if self._mask_notes is None:
            self._mask_notes = MaskNotes()
        return self._mask_notes

    def _flush_notes(self) -> None:
        if self._mask_notes is not None and self._mask_notes.count:
            self._mask_notes.write(self)
            self._mask_notes = None

    def add(self, image_id: str, path: str | os.PathLike, reason: str) -> None:
        # One line per entry: a reason never carries a newline into the CSV.
        row = {"stage": self.stage, "image_id": str(image_id), "path": str(path),
               "reason": " ".join(str(reason).split())}
        if self._sink is not None:
            self._sink.append(csv_line([row[c] for c in COLUMNS]))
        self.rows.append(row)

    def note(self, image_id: str, path: str | os.PathLike, reason: str) -> None:
        """A ``note:`` line: something unusual that was still used (not an error)."""
        self.add(image_id, path, f"note: {reason}")

    @property
    def n_errors(self) -> int:
        """Lines that are errors (not ``note:`` / ``warning:`` lines)."""
        return sum(1 for r in self.rows if not r["reason"].startswith(NOTE_PREFIXES))

    def extend(self, other: "Ledger") -> None:
        self.rows.extend(other.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def frame(self) -> pd.DataFrame:
        import pandas as pd
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def write(self, path: str | os.PathLike) -> None:
        """Write the ledger (an empty file with a header when nothing went wrong); the CSV pandas would write,
        without importing it."""
        self._flush_notes()
        write_text_atomic(path, csv_line(COLUMNS) + "".join(csv_line([r[c] for c in COLUMNS]) for r in self.rows))

    def stream_to(self, path: str | os.PathLike) -> "Ledger":
        """From now on append every line to ``path`` as it is added (the file is started anew with the lines so
        far). Call :meth:`close` at the end."""
        self.write(path)
        self._sink = AppendLog(path)
        return self

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None


def read_ledgers(paths) -> pd.DataFrame:
    import pandas as pd
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in paths if Path(p).exists()]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)
