"""Merge the index and the forgeries into the manifest and cut it into shards.

Forge rows may include reals (label 0) made beside a fake: SBI's colour-transformed target
(``forge.sbi.target_transform: pair``, method ``sbi_target``); they keep their photo's identity and split (checked).

Shards never mix splits: ``{split}_{k:05d}`` holds up to ``shard_size`` images of one split, in image_id
order. Training reads the train and val shards; prediction, fusion and evaluation run on the evaluated split only.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..imageio import write_csv, write_parquet
from ..inputs import read_parquet_arg
from ..sources import MANIFEST_COLUMNS

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--index", required=True, help="index Parquet (morphfuse index)")
    p.add_argument("--forged", nargs="*", default=[], help="rows.parquet files written by morphfuse forge")
    p.add_argument("--shard-size", type=int, required=True, help="images per shard")
    p.add_argument("--out-dir", required=True, help="writes manifest.parquet, shards.csv and shards/{shard}.parquet")


def shard_name(split: str, k: int) -> str:
    return f"{split}_{k:05d}"


def assign_shards(df: pd.DataFrame, shard_size: int) -> pd.DataFrame:
    if shard_size < 1:
        raise UserError(f"shard_size = {shard_size}: must be at least 1")
    df = df.sort_values(["split", "image_id"]).reset_index(drop=True)
    rank = df.groupby("split").cumcount()
    df["shard"] = [shard_name(s, r // shard_size) for s, r in zip(df["split"], rank)]
    return df


def forge_shard_count(index: pd.DataFrame, shard_size: int) -> int:
    """Number of forge shards: the real images (label 0), in image_id order, cut into ``shard_size`` slices."""
    n = int((index["label"] == 0).sum())
    return (n + shard_size - 1) // shard_size


def check_forged_reals(index: pd.DataFrame, forged: pd.DataFrame) -> None:
    """Reals made by the forge stage (label 0: SBI's transformed targets, method ``sbi_target``) must name the one
    real photo of the index they were made from, with its identity (group) and split, so that splits stay
    person-disjoint and every such real is a copy of a known person."""
    reals = forged[forged["label"].astype(int) == 0]
    if not len(reals):
        return
    known = index[index["label"].astype(int) == 0].set_index("image_id")
    for r in reals.to_dict("records"):
        src = str(r["source_ids"])
        if src not in known.index:
            raise UserError(f"forged real {r['image_id']!r}: its source {src!r} is not a real image of the index")
        k = known.loc[src]
        if str(k["group"]) != str(r["group"]) or str(k["split"]) != str(r["split"]):
            raise UserError(f"forged real {r['image_id']!r}: identity/split {r['group']}/{r['split']} differ from "
                            f"its source {src!r} ({k['group']}/{k['split']})")


def build_manifest(index: pd.DataFrame, forged: list[pd.DataFrame], shard_size: int) -> pd.DataFrame:
    """Index rows + forged rows (fakes, and the reals a generator adds beside its fakes: ``sbi_target``), checked
    and cut into shards."""
    parts = [index[MANIFEST_COLUMNS]] + [f[MANIFEST_COLUMNS] for f in forged if len(f)]
    for f in forged:
        if len(f):
            check_forged_reals(index, f)
    df = pd.concat(parts, ignore_index=True)
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise UserError(f"duplicate image_id in the manifest: {dup.iloc[0]!r}")
    return assign_shards(df, shard_size)


def run(args) -> int:
    index = read_parquet_arg(args.index, "--index", MANIFEST_COLUMNS)
    forged = [read_parquet_arg(p, "--forged", MANIFEST_COLUMNS) for p in args.forged]
    df = build_manifest(index, forged, args.shard_size)
    out = Path(args.out_dir)
    write_parquet(out / "manifest.parquet", df)
    shards = df.groupby("shard").agg(split=("split", "first"), n=("image_id", "size"),
                                     n_fake=("label", lambda s: int((s == 1).sum()))).reset_index()
    for name, part in df.groupby("shard"):
        write_parquet(out / "shards" / f"{name}.parquet", part.reset_index(drop=True))
    write_csv(out / "shards.csv", shards)
    extra = int(((df["source"] == "forge") & (df["label"].astype(int) == 0)).sum())
    log.info("manifest: %d images in %d shards (%d of them reals made by the forge stage, e.g. sbi_target)",
             len(df), len(shards), extra)
    return 0
