"""Per-image scores and full-size probability masks of one shard, from a trained LFDL or MITL model.

- LFDL: each face crop gets a score and a map: the pixel head's S×S map (default, ``lfdl.mask_head: pixel``, as
  the IJCAI release submits) or the G×G patch map (``mask_head: patch``); the map is resized (bilinear) to its crop
  box and pasted into a zero canvas of the original size with max. Image score (the release's rule): the mean of the
  face scores ≥ 0.5 if any, else the mean of all face scores (an image without a face has one whole-image crop).
- MITL: the mask is resized (bilinear) back to the original size; the image score comes from the mask
  (``max``, or the mean of the ``top_percent`` highest pixel probabilities), computed on the stored values
  (v/255), so that scoring a mask read back from the PNG gives the same number.

Writes ``OUT/scores.csv`` (image_id,score), ``OUT/masks/{image_id}.png`` (uint8 round(255·p), original size) and
``OUT/ledger.csv`` (images of the manifest shard that have no feature entry: they failed an earlier stage).
Resumable: masks are written atomically and each score is appended to ``OUT/scores.partial.csv`` after its mask;
a rerun skips images that have both, and ``scores.csv`` is written (atomically) only at the end.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from .errors import UserError
from .models.recipes import RECIPES, recipe
from .imageio import prob_to_uint8, write_csv, write_prob_mask, write_text_atomic
from .ledger import Ledger

log = logging.getLogger("morphfuse.predict")

SCORE_RULES = ("max", "top_percent")


# ------------------------------------------------------------------------------------------ pure functions
def resize_prob(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres, edge clamped; OpenCV's INTER_LINEAR) of a float map to height×width."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.shape == (height, width):
        return prob.copy()
    return cv2.resize(prob, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def paste_patch_map(canvas: np.ndarray, patch_map: np.ndarray, box) -> np.ndarray:
    """Resize a crop's map (the pixel head's S×S or the patch head's G×G) to the crop ``box`` = (x0, y0, x1, y1)
    (ints, original px, x1/y1 exclusive) and paste it into ``canvas`` (H×W float) with max, in place. Parts of the
    box outside the canvas are cut."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    if x1 <= x0 or y1 <= y0:
        return canvas
    up = resize_prob(patch_map, y1 - y0, x1 - x0)
    h, w = canvas.shape
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx1 <= cx0 or cy1 <= cy0:
        return canvas
    region = canvas[cy0:cy1, cx0:cx1]
    np.maximum(region, up[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0], out=region)
    return canvas


def image_score_release(face_scores) -> float:
    """The release's rule: mean of the face scores ≥ 0.5 if there are any, else the mean of all of them."""
    s = np.asarray(face_scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("an image needs at least one crop score")
    high = s[s >= 0.5]
    return float(high.mean() if high.size else s.mean())


def mask_score(prob: np.ndarray, rule: str = "top_percent", percent: float = 1.0) -> float:
    """Image score from a probability mask: ``max``, or the mean of the top ``percent`` % pixels (at least one)."""
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    if p.size == 0:
        return 0.0
    if rule == "max":
        return float(p.max())
    if rule == "top_percent":
        k = max(1, int(math.ceil(p.size * float(percent) / 100.0)))
        return float(np.partition(p, p.size - k)[p.size - k:].mean())
    raise ValueError(f"score rule {rule!r}: expected one of {', '.join(SCORE_RULES)}")


def mask_score_u8(values: np.ndarray, rule: str = "top_percent", percent: float = 1.0) -> float:
    """:func:`mask_score` of stored values ``v / 255`` (uint8), from their histogram: no full-size float copy.

    ``max``: max(v) / 255; ``top_percent``: the mean of the top k values (k as in :func:`mask_score`), summed
    exactly in integers and divided once (equal to ``mask_score(v / 255)`` up to float rounding, ~1e-16).
    """
    v = np.asarray(values)
    if v.dtype != np.uint8:
        raise ValueError(f"mask_score_u8 expects uint8 values, got {v.dtype}")
    n = v.size
    if n == 0:
        return 0.0
    if rule == "max":
        return float(int(v.max()) / 255.0)
    if rule != "top_percent":
        raise ValueError(f"score rule {rule!r}: expected one of {', '.join(SCORE_RULES)}")
    k = max(1, int(math.ceil(n * float(percent) / 100.0)))
    flat = v.reshape(-1)
    counts = np.zeros(256, np.int64)
    for i in range(0, n, 1 << 20):  # bincount widens its input to int64: a chunk at a time
        counts += np.bincount(flat[i:i + (1 << 20)], minlength=256)
    total, left = 0, k
    for value in range(255, -1, -1):
        take = min(int(counts[value]), left)
        total += take * value
        left -= take
        if left == 0:
            break
    return float(total / (255 * k))


def lfdl_image_prob(face_scores, patch_maps, crop_boxes, hw) -> tuple[float, np.ndarray]:
    """One image's LFDL score and full-size probability map from its crops (one or more, in the same order):
    ``face_scores`` (n,), ``patch_maps`` (n, M, M: S×S pixel maps or G×G patch maps), ``crop_boxes``
    (n × (x0, y0, x1, y1), original px), ``hw`` =
    (H, W). Each map is pasted (:func:`paste_patch_map`, max) into a zero H×W float32 canvas; the score is
    :func:`image_score_release` of the crop scores. Returns ``(score, prob)``."""
    h, w = (int(v) for v in hw)
    prob = np.zeros((h, w), np.float32)
    for patch_map, box in zip(patch_maps, crop_boxes):
        paste_patch_map(prob, patch_map, box)
    return image_score_release(face_scores), prob


paste_map = paste_patch_map  # the map may be the pixel head's S×S one: the general name


def mitl_image_prob(prob_map, hw, rule: str = "top_percent", percent: float = 1.0) -> tuple[float, np.ndarray]:
    """One image's MITL score and full-size probability map from the model's mask ``prob_map`` (M×M): resized
    (:func:`resize_prob`) to ``hw`` = (H, W) and clipped to [0, 1]; the score is :func:`mask_score` of the stored
    values round(255·p)/255, so scoring the PNG read back gives the same number. Returns ``(score, prob)``."""
    h, w = (int(v) for v in hw)
    prob = resize_prob(prob_map, h, w)
    np.clip(prob, 0.0, 1.0, out=prob)
    return mask_score_u8(prob_to_uint8(prob), rule, percent), prob


# ---------------------------------------------------------------------------------------- resumable output
class ScoreLog:
    """Scores appended one line per image to ``scores.partial.csv`` (after the image's mask is on disk)."""

    def __init__(self, out: Path):
        self.out = out
        self.partial = out / "scores.partial.csv"
        self.final = out / "scores.csv"
        self.scores: dict[str, float] = {}
        for path in (self.final, self.partial):
            self.scores.update(self._read(path))
        # Rewrite the partial file from what parsed (a killed run may have left half a line), then append to it.
        lines = "image_id,score\n" + "".join(f"{_csv_field(k)},{v!r}\n" for k, v in self.scores.items())
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.partial, lines)
        self.fh = open(self.partial, "a", newline="")

    @staticmethod
    def _read(path: Path) -> dict[str, float]:
        if not path.exists():
            return {}
        out: dict[str, float] = {}
        with open(path, newline="") as f:
            text = f.read()
        complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
        for row in csv.reader(complete.splitlines()[1:]):
            if len(row) != 2:
                continue
            try:
                v = float(row[1])
            except ValueError:
                continue
            if math.isfinite(v):
                out[row[0]] = v
        return out

    def add(self, image_id: str, score: float) -> None:
        self.scores[image_id] = float(score)
        self.fh.write(f"{_csv_field(image_id)},{float(score)!r}\n")
        self.fh.flush()

    def finalize(self, order: list[str]) -> None:
        import pandas as pd
        self.fh.close()
        ids = [i for i in order if i in self.scores]
        write_csv(self.final, pd.DataFrame({"image_id": ids, "score": [self.scores[i] for i in ids]}))
        self.partial.unlink(missing_ok=True)

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()


def _csv_field(s: str) -> str:
    s = str(s)
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n\r') else s


# -------------------------------------------------------------------------------------------- prediction
def _batch_tensors(arrays: dict, rows: np.ndarray, model_name: str, device: torch.device) -> dict:
    rgb = torch.from_numpy(np.ascontiguousarray(arrays["rgb"][rows])).permute(0, 3, 1, 2).float() / 255.0
    batch = {"rgb": rgb.to(device)}
    for k in recipe(model_name).precomputed:
        if k in arrays:
            batch[k] = torch.from_numpy(np.asarray(arrays[k][rows], dtype=np.float32)).to(device)
    return batch


def _run_model(model, arrays, rows, model_name, device, batch_size) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    for j in range(0, len(rows), batch_size):
        batch = _batch_tensors(arrays, rows[j:j + batch_size], model_name, device)
        with torch.no_grad():
            s, m = model.predict_proba(batch)
        scores.append(s.float().reshape(-1).cpu().numpy())
        maps.append(m.float()[:, 0].cpu().numpy())
    return np.concatenate(scores), np.concatenate(maps)


def _orig_hw(arrays: dict, row: int, manifest_row) -> tuple[int, int]:
    if "orig_hw" in arrays:
        h, w = (int(v) for v in arrays["orig_hw"][row])
    else:
        h, w = int(manifest_row["height"]), int(manifest_row["width"])
    return h, w


def _open_inputs(model_name: str, model, features, manifest):
    """The manifest shard's rows and the feature shard (rows read per batch), checked against each other and the
    model: ``(man_ids, man_by_id, arrays, rows_of)``, ``rows_of``: image_id -> its feature rows."""
    from .features import open_feature_shard
    from .inputs import read_parquet_arg

    man = read_parquet_arg(manifest, "--manifest", ["image_id"])
    arrays = open_feature_shard(features)  # pixels read per batch, not the whole shard
    for k in ("image_id", "rgb"):
        if k not in arrays:
            raise UserError(f"{features}: feature shard lacks '{k}'")
    n = len(arrays["image_id"])
    size = getattr(model, "size", None)
    if n and size is not None and tuple(arrays["rgb"].shape[1:3]) != (size, size):
        raise UserError(f"{features}: crops are {arrays['rgb'].shape[2]}x{arrays['rgb'].shape[1]} but the model was "
                        f"trained at size {size}")
    for k in recipe(model_name).required_features if n else ():
        if k not in arrays:
            raise UserError(f"{features}: {model_name.upper()} feature shard lacks {k!r} (needed to paste the maps "
                            "back)")

    feat_ids = arrays["image_id"].astype(str)
    rows_of: dict[str, list[int]] = {}
    for r, iid in enumerate(feat_ids):
        rows_of.setdefault(iid, []).append(r)
    man_ids = man["image_id"].astype(str).tolist()
    extra = sorted(set(rows_of) - set(man_ids))
    if extra:
        log.warning("%s: %d feature entr(y/ies) not in the manifest shard %s (ignored), e.g. %s", features,
                    len(extra), manifest, extra[0])

    man_by_id = {iid: row for iid, row in zip(man_ids, man.to_dict("records"))}
    return man_ids, man_by_id, arrays, rows_of


def predict_shard(model_name: str, model: torch.nn.Module, features: str | os.PathLike,
                  manifest: str | os.PathLike, out_dir: str | os.PathLike, batch_size: int = 16,
                  score_rule: str = "top_percent", score_percent: float = 1.0,
                  device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Predict every image of a manifest shard that has feature entries. Returns counts."""
    if model_name not in RECIPES:
        raise UserError(f"unknown model {model_name!r}: expected one of {', '.join(RECIPES)}")
    model_recipe = recipe(model_name)
    if score_rule not in SCORE_RULES:
        raise UserError(f"--score-rule {score_rule!r}: expected one of {', '.join(SCORE_RULES)}")
    if not 0 < float(score_percent) <= 100:
        raise UserError(f"--score-percent {score_percent}: must be in (0, 100]")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be ≥ 1")
    device = torch.device(device)
    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)

    man_ids, man_by_id, arrays, rows_of = _open_inputs(model_name, model, features, manifest)

    ledger = Ledger(f"predict_{model_name}")
    todo_ids: list[str] = []
    for iid in man_ids:
        if iid not in rows_of:
            ledger.add(iid, man_by_id[iid].get("path", ""), f"no entry in {Path(features).name}: the image was not "
                       "usable by an earlier stage (see the faces/crops/features ledgers)")
        else:
            todo_ids.append(iid)

    scores = ScoreLog(out)
    done = {i for i in todo_ids if i in scores.scores and (out / "masks" / f"{i}.png").exists()}
    pending = [i for i in todo_ids if i not in done]
    model = model.to(device).eval()
    if model_recipe.fold_for_inference and callable(getattr(model, "fuse_for_inference", None)):
        model.fuse_for_inference()  # AMW block: 3 convs run as 1 (fewer FLOPs; same up to float rounding)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo_ids), initial=len(done), desc=f"predict {model_name}", unit="img")
    try:
        # Chunks of whole images whose crops fill about one batch.
        chunk: list[str] = []
        n_crops = 0
        for k, iid in enumerate(pending):
            chunk.append(iid)
            n_crops += len(rows_of[iid])
            if n_crops >= batch_size or k == len(pending) - 1:
                rows = np.array([r for i in chunk for r in rows_of[i]], dtype=np.int64)
                face_scores, maps = _run_model(model, arrays, rows, model_name, device, batch_size)
                pos = 0
                for i in chunk:
                    rr = rows_of[i]
                    s_i, m_i = face_scores[pos:pos + len(rr)], maps[pos:pos + len(rr)]
                    pos += len(rr)
                    h, w = _orig_hw(arrays, rr[0], man_by_id[i])
                    if model_recipe.prediction == "faces":
                        score, prob = lfdl_image_prob(s_i, m_i, arrays["crop_box"][rr], (h, w))
                    else:
                        score, prob = mitl_image_prob(m_i[0], (h, w), score_rule, score_percent)
                    write_prob_mask(out / "masks" / f"{i}.png", prob)
                    scores.add(i, score)
                    if bar is not None:
                        bar.update(1)
                chunk, n_crops = [], 0
        scores.finalize(todo_ids)
    finally:
        scores.close()
        if bar is not None:
            bar.close()
    ledger.write(out / "ledger.csv")
    return {"images": len(man_ids), "predicted": len(pending), "skipped_done": len(done),
            "no_features": len(ledger)}


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_name", choices=list(RECIPES), metavar="{" + ",".join(RECIPES) + "}", help="which model")
    p.add_argument("--model", required=True, help="trained model file (model.pt of `morphfuse train`)")
    p.add_argument("--features", required=True, help="this shard's feature file (.npz)")
    p.add_argument("--manifest", required=True, help="this shard's manifest (.parquet)")
    p.add_argument("--out", required=True, help="output folder: scores.csv, masks/, ledger.csv")
    p.add_argument("--config", default=None, help="config.yaml or inline JSON (the MITL score rule: mitl.score)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--score-rule", choices=SCORE_RULES, default=None,
                   help="MITL image score from its mask (default: --config's mitl.score.rule, else the schema's)")
    p.add_argument("--score-percent", type=float, default=None,
                   help="top_percent's percentage (default: --config's mitl.score.percent, else the schema's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the network runs (default: auto = cuda if available)")
    # A test hook (build the network with MODULE:CALLABLE(name, size, options) instead of
    # morphfuse.models.build_model), kept out of the user's --help.
    p.add_argument("--model-factory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from .training.checkpoint import build_from_record, load_model_file, resolve_factory

    from .config import default, load_stage_config

    score_cfg = load_stage_config(args.config)["mitl"]["score"] if args.config else default("mitl.score")
    rule = args.score_rule if args.score_rule is not None else score_cfg["rule"]
    percent = float(args.score_percent if args.score_percent is not None else score_cfg["percent"])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch finds no CUDA device")
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")

    record = load_model_file(args.model, args.model_name)
    model = build_from_record(record, args.model, resolve_factory(args.model_factory))
    if not record.get("finished", True):
        log.warning("%s: this model stopped before the end of its training (step %s)", args.model, record.get("step"))
    res = predict_shard(args.model_name, model, args.features, args.manifest, args.out, batch_size=args.batch_size,
                        score_rule=rule, score_percent=percent, device=device, progress=not args.no_progress)
    log.info("predict %s: %d images, %d predicted, %d already done, %d without features (ledger)", args.model_name,
             res["images"], res["predicted"], res["skipped_done"], res["no_features"])
    return 0
