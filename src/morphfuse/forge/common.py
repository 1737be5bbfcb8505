"""What every forgery generator shares: the generator protocol, its result, seeding and donor pools.

The generator protocol (built-ins in ``sbi.py`` and ``random_combination.py``, diffusion ones in ``diffusion.py``)::

    make_<method>(options: dict) -> Generator          # a factory; heavy set-up (a model) happens here, once

    class Generator(Protocol):
        method: str                                     # "sbi", "random_combination", "sd_inpaint", ...
        needs_donors: bool                              # True: gets a DonorPool (other people of the same split)
        def __call__(self, target: Mapping, rgb: np.ndarray, faces: list[Face], rng: np.random.Generator,
                     options: dict, donors: DonorPool | None = None) -> ForgeResult | Skip: ...

- ``target`` is the real image's manifest row (``image_id``, ``group``, ``split``, ... ; a dict or pandas row).
- ``rgb`` is its pixels (H×W×3 uint8, never modified in place), ``faces`` the face backend's detections
  (largest first, 68-point landmarks for dlib). The caller has already checked that there is a face large enough
  (``options["min_face_size"]``), so a generator only returns :class:`Skip` for reasons of its own (no donor, ...).
- ``rng`` is the ONLY source of randomness (:func:`rng_for` seeds it from the seed and the image), so the same
  seed and input give the same bytes.
- ``options`` is the method's block of the ``forge:`` config (plus ``min_face_size`` and the CLI overrides).

The caller (``forge/cli.py``) writes ``fake_rgb`` losslessly (PNG) and ``mask`` as 0/255 PNG and builds the
manifest row from ``source_ids`` / ``source_groups`` (the target's own id and group come first).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np


@dataclass
class ForgeResult:
    """One forgery. ``fake_rgb`` is H×W×3 uint8 at the target's size; ``mask`` is H×W bool (True = changed)."""

    fake_rgb: np.ndarray
    mask: np.ndarray
    source_ids: list[str]       # image_ids the forgery was made from, the target first
    source_groups: list[str]    # their identities, in the same order
    method: str
    extra: dict[str, Any] = field(default_factory=dict)   # method specifics (not written to the manifest)

    def validate(self, hw: tuple[int, int]) -> None:
        """Raise ``ValueError`` unless the arrays have the documented types and the target's size."""
        f, m = self.fake_rgb, self.mask
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3 or f.shape[:2] != tuple(hw):
            raise ValueError(f"{self.method}: fake_rgb must be {hw[0]}x{hw[1]}x3 uint8, got {f.shape} {f.dtype}")
        if m.dtype != bool or m.shape != tuple(hw):
            raise ValueError(f"{self.method}: mask must be {hw[0]}x{hw[1]} bool, got {m.shape} {m.dtype}")
        if len(self.source_ids) != len(self.source_groups) or not self.source_ids:
            raise ValueError(f"{self.method}: source_ids and source_groups must be non-empty and of equal length")


@dataclass
class Skip:
    """A generator declined this input; ``reason`` goes to the ledger as one line."""

    reason: str


class Generator(Protocol):
    method: str
    needs_donors: bool

    def __call__(self, target: Mapping, rgb: np.ndarray, faces: list, rng: np.random.Generator,
                 options: dict, donors: "DonorPool | None" = None) -> ForgeResult | Skip: ...


GeneratorFactory = Callable[[dict], Generator]


# ------------------------------------------------------------------------------------------------- seeding
def rng_for(seed: int, method: str, image_id: str, k: int = 0) -> np.random.Generator:
    """The numpy Generator of one forgery: seeded from (seed, method, image_id, k), independent of shard/order."""
    digest = hashlib.sha256(f"{method}\0{image_id}\0{k}".encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *words])


def forge_image_id(method: str, target_id: str, k: int) -> str:
    return f"{method}__{target_id}__{k}"


# --------------------------------------------------------------------------------------------- face helpers
def face_side(face) -> float:
    """Size of a face box: the longer side in pixels."""
    x0, y0, x1, y1 = face.box
    return float(max(x1 - x0, y1 - y0))


def largest_face(faces: Sequence) -> Any:
    """The face with the largest box area (backends sort largest first; do not rely on it)."""
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


def has_landmarks(face, n: int = 68) -> bool:
    lm = getattr(face, "landmarks", None)
    return lm is not None and len(lm) >= n


def check_faces(faces: Sequence, min_face_size: float, need_landmarks: bool = True) -> str | None:
    """Why these detections cannot be forged (one line), or None when the largest face is usable."""
    if not faces:
        return "no face detected"
    face = largest_face(faces)
    if need_landmarks and not has_landmarks(face):
        return "no 68-point landmarks for the largest face"
    side = face_side(face)
    if min_face_size and side < min_face_size:
        return f"face too small: largest face is {side:.0f} px, min_face_size is {min_face_size:g} px"
    return None


def odd_kernel(rng: np.random.Generator, lo: int, hi: int) -> int:
    """A random odd kernel size in [lo, hi] (both odd)."""
    return int(rng.integers(lo // 2, hi // 2 + 1)) * 2 + 1


# ------------------------------------------------------------------------------------------------ donors
@dataclass
class Donor:
    """A loaded donor image: its manifest row, pixels and faces."""

    row: Mapping
    rgb: np.ndarray
    faces: list


class DonorPool:
    """Donors for generators that mix people: index rows of the SAME split as the target and a DIFFERENT group.

    ``rows`` is the index (or its real rows); ``load(row) -> (rgb, faces) | str`` loads a donor (a string is the
    reason it cannot be used). Loaded donors are cached. Draws go through the forgery's own ``rng`` over the
    candidates sorted by ``image_id``, so they do not depend on shard boundaries or on what was drawn before.
    """

    def __init__(self, rows, load: Callable[[Mapping], "tuple[np.ndarray, list] | str"], max_cache: int = 64):
        import pandas as pd

        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        if "label" in df.columns:
            df = df[df["label"].astype(int) == 0]
        self._df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
        splits = self._df["split"].astype(str).to_numpy()
        groups = self._df["group"].astype(str).to_numpy()
        self._by_split = {s: (np.nonzero(splits == s)[0], groups[splits == s]) for s in np.unique(splits)}
        self._load = load
        self._cache: dict[str, Donor | str] = {}
        self._max_cache = max_cache
        self.failures: list[tuple[str, str, str]] = []   # (image_id, path, reason) of unusable donors

    def __len__(self) -> int:
        return len(self._df)

    def candidate_index(self, split: str, exclude_group: str) -> np.ndarray:
        """Positions (in image_id order) of the rows of ``split`` whose group is not ``exclude_group``."""
        idx, groups = self._by_split.get(str(split), (np.zeros(0, np.int64), np.zeros(0, str)))
        return idx[groups != str(exclude_group)]

    def candidates(self, split: str, exclude_group: str) -> list[Mapping]:
        """Rows of ``split`` whose group is not ``exclude_group``, sorted by image_id (small pools: tests)."""
        return [self._df.iloc[int(i)] for i in self.candidate_index(split, exclude_group)]

    def get(self, row: Mapping) -> Donor | str:
        key = str(row["image_id"])
        if key not in self._cache:
            if len(self._cache) >= self._max_cache:
                self._cache.pop(next(iter(self._cache)))
            got = self._load(row)
            if isinstance(got, str):
                self.failures.append((key, str(row.get("path", "")), got))
                self._cache[key] = got
            else:
                self._cache[key] = Donor(row=row, rgb=got[0], faces=got[1])
        return self._cache[key]

    def draw(self, rng: np.random.Generator, target: Mapping, n: int, distinct_groups: bool = True,
             accept: Callable[[Donor], bool] | None = None, max_tries: int = 32) -> list[Donor]:
        """Up to ``n`` usable donors for ``target`` (same split, other groups), drawn with ``rng``.

        Candidates are visited in a random permutation; unusable ones (unreadable, no face, rejected by
        ``accept``) are passed over. With ``distinct_groups`` no two donors show the same person.
        """
        cands = self.candidate_index(target["split"], target["group"])
        out: list[Donor] = []
        seen_groups: set[str] = set()
        tries = 0
        for i in rng.permutation(len(cands)):
            if len(out) >= n or tries >= max_tries:
                break
            row = self._df.iloc[int(cands[int(i)])]
            if distinct_groups and str(row["group"]) in seen_groups:
                continue
            tries += 1
            d = self.get(row)
            if isinstance(d, str) or (accept is not None and not accept(d)):
                continue
            out.append(d)
            seen_groups.add(str(row["group"]))
        return out
