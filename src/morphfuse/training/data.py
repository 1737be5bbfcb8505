"""Training data from feature shards, streamed: the split index, the per-sample dataset and the data order.

Feature shards (``features/{lfdl,mitl}/{shard}.npz``, docs/ARCHITECTURE.md) hold uint8 pixels and masks plus,
in ``precompute`` mode, the SRM / DCT arrays. Training never loads them: :class:`SplitRows` reads the small per-row
members (split, label, has_mask) of every shard once and keeps a ``(shard, row)`` index of the rows of one split
(about 10 bytes per row); :class:`FeatureDataset` reads a sample's pixels, mask, box and precomputed arrays by
offset when it is asked for it (:mod:`morphfuse.shards`). A process therefore holds the model, its batches in
flight and the index, whatever the number of rows, and each rank reads only the samples it trains on.

Determinism: the sample at position ``p`` of epoch ``e`` is augmented by ``numpy.random.default_rng([seed, e,
row])`` (``[seed, e, row, k]`` for the k-th extra copy of a row that balancing drew more than once) and the order of
an epoch is ``DistributedSampler(seed, epoch)``'s over the epoch's samples, so both are functions of (seed, epoch,
position) alone. A resumed run therefore sees exactly the batches an uninterrupted one would, whatever the number
of data workers.

Balance (``train.balance``): ``none`` trains on every row each epoch; ``resample_real`` (the releases' rule) trains
each epoch on every fake row and as many real rows drawn from the reals by ``default_rng([seed, 0x62616C,
epoch])``: without replacement when there are enough reals, else every real ``fakes // reals`` times plus a draw
without replacement for the rest. The samples of an epoch are kept in row order (copies side by side), so with as
many reals as fakes the epoch is the plain one.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from ..errors import UserError
from ..models.recipes import recipe
from ..shards import NpzRows, ShardPool
from .augment import augment as augment_sample

log = logging.getLogger("morphfuse.train")

REQUIRED = ("image_id", "rgb", "mask", "label", "split")
# Per-row arrays we carry (everything else in a shard is ignored by training).
PER_ROW = ("image_id", "face_idx", "rgb", "mask", "has_mask", "label", "ref_box", "split", "orig_hw", "crop_box")
BALANCE = ("none", "resample_real")
BALANCE_SALT = 0x62616C  # "bal": the balancing draw's own stream, apart from augmentation and mixup


def feature_paths(items) -> list[Path]:
    """Expand ``--features`` arguments: files as given, folders to their ``*.npz`` (sorted)."""
    out: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = sorted(p.glob("*.npz"))
            if not found:
                raise UserError(f"{p}: feature folder holds no .npz shard")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: feature shard does not exist")
    if not out:
        raise UserError("no feature shards given (--features)")
    return out


def check_shard(shard: NpzRows, model_name: str, size: int | None = None) -> int:
    """Check one feature shard from its ``.npy`` headers alone (no pixel is read): the required members, one row
    count for every per-row member, uint8 N×S×S×3 pixels at the model's size and masks to match. Errors name the
    file and the problem. Returns the row count."""
    path, m = shard.path, shard.members
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise UserError(f"{path}: feature shard lacks {', '.join(missing)} (is it a {model_name} shard?)")
    n = len(m["image_id"])
    for k in PER_ROW + recipe(model_name).precomputed:
        if k in m and m[k].shape and len(m[k]) != n:
            raise UserError(f"{path}: '{k}' has {len(m[k])} rows but 'image_id' has {n}")
    rgb = m["rgb"]
    if n and (len(rgb.shape) != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8):
        raise UserError(f"{path}: 'rgb' must be N×S×S×3 uint8, got {rgb.shape} {rgb.dtype}")
    if n and size is not None and rgb.shape[1:3] != (size, size):
        raise UserError(f"{path}: images are {rgb.shape[2]}x{rgb.shape[1]} but the {model_name} model is configured "
                        f"for size {size}; rerun `morphfuse features` or fix {model_name}.size")
    if n and m["mask"].shape != rgb.shape[:3]:
        raise UserError(f"{path}: 'mask' is {m['mask'].shape}, expected {rgb.shape[:3]}")
    return n


def open_shards(paths, model_name: str, size: int | None = None, max_open: int = 64) -> ShardPool:
    """The shards' row readers, every shard checked from its headers."""
    pool = ShardPool(paths, max_open=max_open)
    for shard in pool.shards:
        check_shard(shard, model_name, size)
    return pool


class SplitRows:
    """The rows of one split over many shards: a ``(shard, row)`` index plus label and has_mask, ~10 bytes a
    row; pixels and everything else are read per sample. ``keys``: the optional per-sample members present in
    every shard (``ref_box``; the precomputed SRM / DCT with ``precomputed``)."""

    def __init__(self, pool: ShardPool, model_name: str, split: str, precomputed: bool):
        self.pool, self.model_name, self.split = pool, model_name, split
        shard, row, label, has_mask, starts = [], [], [], [], [0]
        for k, sh in enumerate(pool.shards):
            sel = np.flatnonzero(sh.read("split").astype(str) == split).astype(np.int32)
            shard.append(np.full(len(sel), k, np.int32))
            row.append(sel)
            label.append(sh.read("label")[sel].astype(np.int8))
            has_mask.append(sh.read("has_mask")[sel].astype(bool) if "has_mask" in sh else np.ones(len(sel), bool))
            starts.append(starts[-1] + len(sel))
        def cat(parts, dt):
            return np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)

        self.shard, self.row = cat(shard, np.int32), cat(row, np.int32)
        self.label, self.has_mask = cat(label, np.int8), cat(has_mask, bool)
        self.starts = np.asarray(starts, np.int64)
        used = [sh for sh, a, b in zip(pool.shards, starts[:-1], starts[1:]) if b > a]
        optional = ("ref_box",) + (recipe(model_name).precomputed if precomputed else ())
        self.keys = tuple(k for k in optional if used and all(k in sh for sh in used))

    def __len__(self) -> int:
        return len(self.row)

    def read(self, i: int, key: str) -> np.ndarray:
        return self.pool[int(self.shard[i])].row(key, int(self.row[i]))

    def fingerprint(self) -> str:
        """:func:`fingerprint` of this split's rows, computed shard by shard from the ids alone."""
        h = hashlib.sha256()
        for k, sh in enumerate(self.pool.shards):
            sel = self.row[self.starts[k]:self.starts[k + 1]]
            if not len(sel):
                continue
            ids = sh.read("image_id")[sel].astype(str)
            face = sh.read("face_idx")[sel] if "face_idx" in sh else np.zeros(len(sel), np.int64)
            for i, f in zip(ids, face):
                h.update(f"{i}\t{int(f)}\n".encode())
        return h.hexdigest()[:16]


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """Identity of a training set (its row ids in order): a resume on other data is reported, not hidden."""
    h = hashlib.sha256()
    ids = arrays.get("image_id", np.array([]))
    face = arrays.get("face_idx", np.zeros(len(ids), np.int64))
    for i, f in zip(ids.astype(str), face):
        h.update(f"{i}\t{int(f)}\n".encode())
    return h.hexdigest()[:16]


class FeatureDataset(Dataset):
    """Items are model-protocol dicts (docs/CONTRACTS.md) on the wire format of the loader: ``rgb`` (3,S,S) and
    ``mask`` (1,S,S) as uint8, ``label``, ``has_mask``, ``row`` (the sample's row in the split), LFDL ``ref_box``,
    and precomputed ``srm`` / ``dct_*`` (float16) when kept and not augmenting. :func:`finish_batch` turns a
    collated batch into the model's floats (on the device: a quarter of the bytes cross process and bus).

    Indexed by ``(epoch, row[, copy])`` so that the augmentation seed travels with the index (workers hold no
    state); a plain ``row`` means epoch 0.
    """

    def __init__(self, rows: SplitRows, model_name: str, augment: bool, seed: int):
        self.rows = rows
        self.model_name = model_name
        self.augment = augment
        self.seed = int(seed)
        self.n = len(rows)
        self.pre_keys = () if augment else tuple(k for k in recipe(model_name).precomputed if k in rows.keys)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        epoch, i, copy = (tuple(key) + (0,))[:3] if isinstance(key, tuple) else (0, key, 0)
        i = int(i)
        r = self.rows
        rgb, mask = r.read(i, "rgb"), r.read(i, "mask")
        box = None
        if "ref_box" in r.keys:
            box = np.asarray(r.read(i, "ref_box"), dtype=np.float32)
            box = box if np.all(np.isfinite(box)) else None
        if self.augment:
            rng = np.random.default_rng([self.seed, int(epoch), i] + ([int(copy)] if copy else []))
            rgb, mask, box = augment_sample(self.model_name, rgb, mask, rng, box)
        item = {
            "rgb": torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1),
            "mask": torch.from_numpy(np.ascontiguousarray(mask))[None],
            "label": torch.tensor(float(r.label[i]), dtype=torch.float32),
            "has_mask": torch.tensor(bool(r.has_mask[i])),
            "row": torch.tensor(i, dtype=torch.int64),
        }
        if "ref_box" in recipe(self.model_name).sample_keys:
            item["ref_box"] = (
                torch.from_numpy(box.astype(np.float32)) if box is not None else torch.full((4,), float("nan"))
            )
        for k in self.pre_keys:
            item[k] = torch.from_numpy(r.read(i, k))
        return item


def finish_batch(batch: dict) -> dict:
    """A collated loader batch (:class:`FeatureDataset`'s wire format) as model inputs: ``rgb`` float32 in
    [0, 1] (``/ 255``), ``mask`` float32 0/1 (``> 127.5``), precomputed arrays float32. Exactly the numbers of
    converting each sample on its own, wherever the batch is (run it after moving the batch to the device)."""
    out = dict(batch)
    if out["rgb"].dtype == torch.uint8:
        out["rgb"] = out["rgb"].float() / 255.0
    if out["mask"].dtype == torch.uint8:
        out["mask"] = (out["mask"] > 127).float()
    for k in ("srm", "dct_high", "dct_low"):
        if k in out and out[k].dtype == torch.float16:
            out[k] = out[k].float()
    return out


def epoch_samples(labels: np.ndarray, balance: str, seed: int, epoch: int) -> np.ndarray | None:
    """The rows of one epoch's samples in row order (copies side by side), or None for every row once.

    ``resample_real``: every fake row plus as many real rows as there are fakes, drawn by
    ``default_rng([seed, BALANCE_SALT, epoch])`` (module docstring). Without both classes there is nothing to
    balance: every row once."""
    if balance == "none":
        return None
    if balance != "resample_real":
        raise UserError(f"train.balance = {balance!r}: must be one of {', '.join(BALANCE)}")
    labels = np.asarray(labels)
    fakes, reals = np.flatnonzero(labels == 1), np.flatnonzero(labels != 1)
    if not len(fakes) or not len(reals):
        return None
    rng = np.random.default_rng([int(seed), BALANCE_SALT, int(epoch)])
    q, r = divmod(len(fakes), len(reals))
    drawn = np.concatenate([np.repeat(reals, q), rng.choice(reals, r, replace=False)])
    return np.sort(np.concatenate([fakes, drawn]), kind="stable").astype(np.int64)


class EpochSamples:
    """The samples of each epoch (:func:`epoch_samples`), cached for the current one: positions of
    :func:`epoch_order` → dataset keys ``(epoch, row, copy)``."""

    def __init__(self, labels: np.ndarray, balance: str, seed: int):
        self.labels, self.balance, self.seed = np.asarray(labels), balance, int(seed)
        self.n = len(self.labels)
        self._epoch, self._rows, self._copy = None, None, None
        if balance not in BALANCE:
            raise UserError(f"train.balance = {balance!r}: must be one of {', '.join(BALANCE)}")
        if balance != "none" and epoch_samples(self.labels, balance, seed, 0) is None and self.n:
            log.warning("train.balance = %s: the training rows hold only one class (%d fake of %d); every row is "
                        "used once per epoch", balance, int(np.sum(self.labels == 1)), self.n)

    def _load(self, epoch: int) -> None:
        if self._epoch != epoch:
            rows = epoch_samples(self.labels, self.balance, self.seed, epoch)
            if rows is None:
                self._rows, self._copy = None, None
            else:
                self._rows = rows
                self._copy = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
            self._epoch = epoch

    def length(self, epoch: int) -> int:
        self._load(epoch)
        return self.n if self._rows is None else len(self._rows)

    def rows(self, epoch: int) -> np.ndarray:
        """Row of every position of the epoch."""
        self._load(epoch)
        return np.arange(self.n) if self._rows is None else self._rows

    def keys(self, epoch: int, positions) -> list[tuple[int, int, int]]:
        self._load(epoch)
        if self._rows is None:
            return [(epoch, int(p), 0) for p in positions]
        return [(epoch, int(self._rows[p]), int(self._copy[p])) for p in positions]


def epoch_order(n: int, seed: int, epoch: int, world_size: int = 1, shuffle: bool = True) -> np.ndarray:
    """The data order of one epoch: row ``r`` is rank ``r``'s sample indices, as ``DistributedSampler`` (seed,
    epoch) deals them (every rank the same number, the permutation padded by wrapping). ``(world, m)`` int64."""
    if n == 0:
        return np.zeros((world_size, 0), np.int64)
    rows = []
    for rank in range(world_size):
        sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        rows.append(list(sampler))
    return np.asarray(rows, dtype=np.int64)


def batches_of(indices, batch_size: int, drop_last: bool = True) -> list[list[int]]:
    """Cut one rank's indices into micro-batches. An incomplete last batch is dropped (BatchNorm and the SSPSL
    anchors need several samples), unless that would leave none."""
    idx = [int(i) for i in indices]
    batches = [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    return batches


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world_size: int = 1, rank: int = 0,
                  shuffle: bool = True, drop_last: bool = True) -> list[list[int]]:
    """This rank's micro-batches of one epoch (:func:`epoch_order` cut by :func:`batches_of`)."""
    return batches_of(epoch_order(n, seed, epoch, world_size, shuffle)[rank], batch_size, drop_last)


def eval_batches(n: int, batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """Validation rows of this rank: every world-th row, no padding, so each row is seen exactly once."""
    idx = list(range(rank, n, world_size))
    return [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
