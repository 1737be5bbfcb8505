"""Identity-disjoint train/val/test split, decided on the REAL images' groups before any forgery is made."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from .sources import SPLITS


def split_groups(groups, fractions: dict[str, float], seed: int = 0) -> dict[str, str]:
    """Assign each group to a split. Deterministic for a seed and independent of input order.

    Group counts per split are the fractions times the number of groups, rounded so they add up, and every split
    with a non-zero fraction gets at least one group when there are enough groups.
    """
    uniq = sorted(set(map(str, groups)))
    n = len(uniq)
    rng = np.random.default_rng(seed)
    order = [uniq[i] for i in rng.permutation(n)]
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    raw = np.array([fractions[s] for s in names], dtype=float)
    raw = raw / raw.sum() * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: n - counts.sum()]:  # largest remainders
        counts[i] += 1
    if n >= len(names):
        for i in range(len(names)):  # no empty split: borrow from the largest
            if counts[i] == 0:
                counts[i] += 1
                counts[int(np.argmax(counts))] -= 1
    out, start = {}, 0
    for name, c in zip(names, counts):
        for g in order[start:start + c]:
            out[g] = name
        start += c
    return out


def _hash_split(group: str, fractions: dict[str, float], seed: int) -> str:
    """Split of a group never seen among the reals: a stable hash draw with the same fractions."""
    u = int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:12], 16) / 16 ** 12
    acc = 0.0
    for s in SPLITS:
        acc += fractions.get(s, 0)
        if u < acc:
            return s
    return SPLITS[-1]


def assign_splits(df: pd.DataFrame, fractions: dict[str, float], seed: int = 0) -> pd.DataFrame:
    """Fill the ``split`` column where it is empty.

    Reals (label 0) are split by group; imported fakes take the split of a real with the same group, else a stable
    hash of their group. Rows whose split the source fixed (DDL-I's train/valid/test) keep it.
    """
    df = df.copy()
    free = df["split"].fillna("") == ""
    reals = df[free & (df["label"] == 0)]
    mapping = split_groups(reals["group"], fractions, seed)
    fixed_real = df[~free & (df["label"] == 0)]
    for g, s in zip(fixed_real["group"], fixed_real["split"]):
        mapping.setdefault(g, s)
    df.loc[free, "split"] = [mapping.get(g) or _hash_split(g, fractions, seed) for g in df.loc[free, "group"]]
    return df
