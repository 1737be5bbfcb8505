"""Index the configured sources and split the real images by identity (``index/index.parquet``).

Reads only file headers. The split is decided on the real images' identity groups (config ``split``), so no
person is in two splits; forgeries made later take the split of their sources.
"""
from __future__ import annotations

import logging

from ..config import load_stage_config, resolve_path
from ..imageio import write_parquet
from ..ledger import Ledger
from ..sources import index_sources
from ..split import assign_splits

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument(
        "--config", required=True, help="config.yaml, or the inline JSON slice a rule passes (sources:, split:)"
    )
    p.add_argument("--out", required=True, help="index Parquet to write")
    p.add_argument("--ledger", help="CSV of files that could not be indexed")


def build_index(cfg: dict, ledger: Ledger):
    sources = [dict(s, root=str(resolve_path(s["root"]))) for s in cfg["sources"]]
    # config `images` (min_side, max_aspect): read with the defaults until the schema's defaults are filled in.
    df = index_sources(sources, ledger, cfg["images"])
    sp = cfg["split"]
    df = assign_splits(df, sp["fractions"], sp["seed"])
    return df.sort_values("image_id").reset_index(drop=True)


def run(args) -> int:
    cfg = load_stage_config(args.config)
    ledger = Ledger("index")
    df = build_index(cfg, ledger)
    write_parquet(args.out, df)
    if args.ledger:
        ledger.write(args.ledger)
    summary = df.groupby(["split", "label"]).size().to_dict()
    log.info("indexed %d images (%d unusable): %s", len(df), len(ledger), summary)
    return 0
