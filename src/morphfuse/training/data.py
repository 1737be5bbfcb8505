"""Training data from feature shards: loading, the per-sample dataset and the (resumable) data order.

Feature shards (``features/{lfdl,mitl}/{shard}.npz``, docs/ARCHITECTURE.md) hold uint8 pixels and masks plus,
in ``precompute`` mode, the SRM / DCT arrays. The engine keeps the rows of the ``train`` and ``val`` splits in
memory (the demo's shards are small; at DDL-I scale the features run ``on_the_fly`` and store uint8 only).

Determinism: sample ``i`` of epoch ``e`` is augmented by ``numpy.random.default_rng([seed, e, i])`` and the order of
an epoch is ``DistributedSampler(seed, epoch)``'s, so both are functions of (seed, epoch, position) alone. A resumed
run therefore sees exactly the batches an uninterrupted one would, whatever the number of data workers.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from ..errors import UserError
from .augment import augment as augment_sample

REQUIRED = ("image_id", "rgb", "mask", "label", "split")
PRECOMPUTED = {"lfdl": ("srm",), "mitl": ("dct_high", "dct_low")}
# Per-row arrays we carry (everything else in a shard is ignored by training).
PER_ROW = ("image_id", "face_idx", "rgb", "mask", "has_mask", "label", "ref_box", "split", "orig_hw", "crop_box")


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


def read_feature_shard(path: str | os.PathLike, model_name: str, size: int | None = None) -> dict[str, np.ndarray]:
    """Read and check one feature shard (npz, no pickles). Errors name the file and the problem."""
    path = Path(path)
    try:
        from ..features import load_feature_shard
    except ImportError:  # pragma: no cover - features.py is part of the package
        load_feature_shard = None
    if load_feature_shard is not None:
        arrays = load_feature_shard(path)
    else:  # pragma: no cover
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: not a readable feature shard ({type(e).__name__}: {e})") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise UserError(f"{path}: feature shard lacks {', '.join(missing)} (is it a {model_name} shard?)")
    n = len(arrays["image_id"])
    for k in PER_ROW + PRECOMPUTED[model_name]:
        if k in arrays and arrays[k].ndim and len(arrays[k]) != n:
            raise UserError(f"{path}: '{k}' has {len(arrays[k])} rows but 'image_id' has {n}")
    rgb = arrays["rgb"]
    if n and (rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8):
        raise UserError(f"{path}: 'rgb' must be N×S×S×3 uint8, got {rgb.shape} {rgb.dtype}")
    if n and size is not None and rgb.shape[1:3] != (size, size):
        raise UserError(f"{path}: images are {rgb.shape[2]}x{rgb.shape[1]} but the {model_name} model is configured "
                        f"for size {size}; rerun `morphfuse features` or fix {model_name}.size")
    if n and arrays["mask"].shape != rgb.shape[:3]:
        raise UserError(f"{path}: 'mask' is {arrays['mask'].shape}, expected {rgb.shape[:3]}")
    return arrays


def load_splits(paths, model_name: str, size: int, splits=("train", "val"),
                precomputed_for=("val",)) -> dict[str, dict[str, np.ndarray]]:
    """Concatenate the rows of each split over all shards. Precomputed SRM/DCT arrays are kept only for the
    splits in ``precomputed_for`` (augmented training pixels need them recomputed anyway)."""
    parts: dict[str, list[dict]] = {s: [] for s in splits}
    for p in paths:
        arrays = read_feature_shard(p, model_name, size)
        split = arrays["split"].astype(str)
        for s in splits:
            sel = np.flatnonzero(split == s)
            if not len(sel):
                continue
            keys = [k for k in PER_ROW if k in arrays]
            if s in precomputed_for:
                keys += [k for k in PRECOMPUTED[model_name] if k in arrays]
            parts[s].append({k: arrays[k][sel] for k in keys})
    out: dict[str, dict[str, np.ndarray]] = {}
    for s, chunks in parts.items():
        if not chunks:
            out[s] = {}
            continue
        common = set.intersection(*(set(c) for c in chunks))  # a key absent from one shard is dropped everywhere
        out[s] = {k: np.concatenate([c[k] for c in chunks]) for k in sorted(common)}
    return out


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """Identity of a training set (its row ids in order): a resume on other data is reported, not hidden."""
    h = hashlib.sha256()
    ids = arrays.get("image_id", np.array([]))
    face = arrays.get("face_idx", np.zeros(len(ids), np.int64))
    for i, f in zip(ids.astype(str), face):
        h.update(f"{i}\t{int(f)}\n".encode())
    return h.hexdigest()[:16]


class FeatureDataset(Dataset):
    """Items are model-protocol dicts (docs/CONTRACTS.md): ``rgb`` (3,S,S) in [0,1], ``mask`` (1,S,S) 0/1,
    ``label``, ``has_mask``, LFDL ``ref_box``, and precomputed ``srm`` / ``dct_*`` when kept and not augmenting.

    Indexed by ``(epoch, row)`` so that the augmentation seed travels with the index (workers hold no state).
    """

    def __init__(self, arrays: dict[str, np.ndarray], model_name: str, augment: bool, seed: int):
        self.a = arrays
        self.model_name = model_name
        self.augment = augment
        self.seed = int(seed)
        self.n = len(arrays.get("image_id", ()))
        self.pre_keys = () if augment else tuple(k for k in PRECOMPUTED[model_name] if k in arrays)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        a = self.a
        rgb, mask = a["rgb"][i], a["mask"][i]
        box = None
        if "ref_box" in a:
            box = np.asarray(a["ref_box"][i], dtype=np.float32)
            box = box if np.all(np.isfinite(box)) else None
        if self.augment:
            rng = np.random.default_rng([self.seed, int(epoch), int(i)])
            rgb, mask, box = augment_sample(self.model_name, rgb, mask, rng, box)
        item = {
            "rgb": torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0,
            "mask": torch.from_numpy(np.asarray(mask) > 127.5)[None].float(),
            "label": torch.tensor(float(a["label"][i]), dtype=torch.float32),
            "has_mask": torch.tensor(bool(a["has_mask"][i]) if "has_mask" in a else True),
        }
        if self.model_name == "lfdl":
            item["ref_box"] = torch.from_numpy(box.astype(np.float32)) if box is not None else torch.full((4,), float("nan"))
        for k in self.pre_keys:
            item[k] = torch.from_numpy(np.asarray(a[k][i], dtype=np.float32))
        return item


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
