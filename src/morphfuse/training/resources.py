"""Memory a training job needs, from what sets it: model, batch size, data workers and processes (GPUs), never the
number of training rows (the data are streamed: :mod:`morphfuse.training.data`).

Per training process (MB)::

    base[model] + workers · WORKER_MB + batch_size · sample_mb · (IN_FLIGHT + PREFETCH · workers)

- ``base``: Python, torch and the CUDA context, the network and its optimizer state copied to host memory when a
  checkpoint is written (LFDL 55 M parameters, MITL 85 M: weights + Adam's two moments), the row index (~10 bytes
  per training row: 15 MB at 1.5 M rows, inside the margin);
- ``sample_mb``: one sample's uint8 pixels and mask, ``size² · 4`` bytes; augmentation makes a few temporaries
  of each and the main process holds the collated batch and its pinned copy (``IN_FLIGHT``);
- each data worker is a forked process with its own heap (``WORKER_MB``) and ``PREFETCH`` batches queued.

A job runs ``gpus`` processes (torchrun, one per GPU). The constants are upper bounds of what
``benchmarks/bench_train_memory.py`` measured (BENCHMARKS.md, "Training memory"), plus ``MARGIN``.
"""
from __future__ import annotations

import math

BASE_MB = {"lfdl": 3000, "mitl": 4000}
WORKER_MB = 600
IN_FLIGHT = 8
PREFETCH = 2  # torch DataLoader's default prefetch_factor
MARGIN = 1.25


def sample_mb(size: int) -> float:
    return size * size * 4 / 2**20


def train_mem_mb(model: str, size: int, batch_size: int, num_workers: int, processes: int = 1) -> int:
    """``mem_mb`` for one training job (all its processes), rounded up to 1000 MB."""
    per = (BASE_MB[model] + num_workers * WORKER_MB
           + batch_size * sample_mb(size) * (IN_FLIGHT + PREFETCH * num_workers))
    return int(math.ceil(max(1, processes) * per * MARGIN / 1000.0) * 1000)


def train_mem_mb_from_config(config: dict, model: str) -> int:
    """:func:`train_mem_mb` of a model's config block (``size``, ``train.batch_size``, ``train.num_workers``,
    ``gpus``: one process per GPU, one for a CPU run)."""
    block = config[model]
    train = block["train"]
    return train_mem_mb(model, int(block["size"]), int(train["batch_size"]), int(train.get("num_workers", 0)),
                        max(1, int(block.get("gpus", 1))))
