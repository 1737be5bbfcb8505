"""Text formats shared by the stages that write summaries: numbers in Markdown cells, Markdown tables, JSON.

One owner for each, so that every table and JSON file of a run formats the same value the same way. No pandas
import here: ``morphfuse detect`` uses the JSON helpers and stays free of pandas (tests/test_api.py).
"""
from __future__ import annotations

import math
import sys
from pathlib import PurePath

import numpy as np

DASH = "–"  # an undefined metric (NaN, None) in a Markdown cell


def fmt_metric(v, nd: int = 4) -> str:
    """A metric for a Markdown cell: ``nd`` decimals, or a dash when undefined.

    >>> fmt_metric(0.123456), fmt_metric(float("nan")), fmt_metric(None)
    ('0.1235', '–', '–')
    """
    return DASH if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _defined(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def fmt_estimate(row, key: str, nd: int = 4, interval: bool = True) -> str:
    """``row[key]`` with its bootstrap interval (``row[key + "_lo"]``, ``row[key + "_hi"]``) when both are defined
    and ``interval``: a table cell of the ablation and robustness tables.

    >>> fmt_estimate({"f1": 0.5, "f1_lo": 0.4, "f1_hi": 0.6}, "f1", nd=2), fmt_estimate({"f1": None}, "f1")
    ('0.50 [0.40, 0.60]', '–')
    """
    v = row.get(key)
    if not _defined(v):
        return DASH
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if interval and _defined(lo) and _defined(hi):
        return f"{v:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"
    return f"{v:.{nd}f}"


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """A GitHub Markdown table as lines (cells converted with ``str``).

    >>> md_table(["a", "b"], [[1, "x"]])
    ['| a | b |', '|---|---|', '| 1 | x |']
    """
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def json_ready(o):
    """A copy that ``json.dumps`` writes as standard JSON: NaN and pandas' NA become null, keys strings,
    tuples lists, recursively.

    >>> json_ready({1: (float("nan"), 2.5)})
    {'1': [None, 2.5]}
    """
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_ready(v) for v in o]
    pd = sys.modules.get("pandas")  # NA exists only where pandas was imported by whoever made ``o``
    if (pd is not None and o is pd.NA) or (isinstance(o, (float, np.floating)) and math.isnan(o)):
        return None
    return o


def json_default(o):
    """``json.dumps(default=...)`` for numpy scalars (a non-finite float becomes null) and paths; anything else
    is a ``TypeError``, as without a default.

    >>> import json; json.dumps([np.int64(3), np.float32("inf"), np.bool_(True)], default=json_default)
    '[3, null, true]'
    """
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        v = float(o)
        return v if math.isfinite(v) else None
    if isinstance(o, PurePath):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
