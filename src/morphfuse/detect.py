"""Apply a model bundle (``morphfuse export``) to your own images: is each one manipulated, and where?

  morphfuse detect photo.jpg more_photos/ --models results/demo/bundle --out detections/

Inputs: image files and folders (searched recursively for .jpg .jpeg .png .webp .bmp .tif .tiff; hidden files
and folders skipped; symbolic links followed, each folder and file once: a link loop or a dangling link is a
ledger line). The --out folder and any other morphfuse output folder are never taken as inputs. Per image,
exactly as the workflow does it with the bundle's settings (bundle.json): faces are detected (the bundle's
backend and options), each face gets an adaptive crop (the whole image when there is no face or a face fills most
of it), LFDL scores every crop and gives its patch map, pasted back at the original size; MITL looks at the whole
image and gives a full-size mask; the two masks are fused (``--variant``, default the bundle's: mdmf) at the
bundle's kernel and threshold.

Outputs in --out (names: see below):
  masks/NAME.png          fused mask, same size as the image: 255 = manipulated, 0 = pristine
  prob/NAME_lfdl.png      LFDL probability map as data (grey level = round(255 x probability); black outside
                          faces): the exact values, for other tools (e.g. `predictions-from-files`)
  prob/NAME_mitl.png      MITL probability map (the same encoding)
  heatmaps/NAME.png       the two maps for the eye: side by side in the viridis colour map (dark = 0, light
                          yellow = 1), with a colour bar marking the mask threshold t; at most 1024 px a side
  overlays/NAME.png       the image, same size, drawn to match its verdict: FAKE (score >= the fake threshold)
                          has the fused mask tinted red and outlined in yellow ("manipulated, p >= t"); REAL has
                          nothing tinted, the regions above t only outlined in cyan ("image judged real"); face
                          crops in green; the verdict and scores across the top, a legend across the bottom
  scores.csv              one row per image, appended as each image finishes: image (NAME), path (absolute),
                          score (the image score: LFDL's, as in the paper), mitl_score (MITL's score from its mask,
                          for comparison), fake (score >= 0.5), n_faces (faces detected), mask_fraction (share of
                          the image's pixels in the fused mask), stamp (the input's size:mtime when processed)
  ledger.csv              one line per input that could not be used (stage, image, path, reason), appended as
                          found
  scores.json             written when the run completes: the settings used, every image's row, the failed inputs

NAME: a file given on the command line is named by its file name without extension; a file found in a folder by
its path relative to that folder, '/' replaced by '__', without extension. Characters other than letters, digits,
'.', '_' and '-' become '_'. When two inputs would get the same NAME (also across runs into one --out), the later
one gets its extension appended (photo_png), then a number (photo_2).

Nothing is lost: each image's files are written atomically and then its scores.csv line (one write each), so an
interruption (SIGTERM, kill -9, Ctrl-C) or a full disk loses at most the image in flight. Running the same command
again resumes: inputs already in scores.csv (same path, same size and mtime) are skipped; inputs that failed are
tried again. One --out belongs to one bundle and settings (variant, kernel, threshold, --min-side,
--max-aspect, --perturb; recorded in --out/.morphfuse-run.json): an --out holding another run's outputs is refused
(exit 2) unless --overwrite is given, which removes them first; more images with the same settings are added to it, so
every mask there has its scores.csv row. A second detect into an --out in use is refused (exit 2; a lock,
--out/.morphfuse.lock).

Images that cannot be analysed are skipped with one line on stderr and in the ledger, and the others are still
processed: unreadable files (the reason says what is wrong: corrupt, truncated, empty, unknown format, over the
pixel limit, unsupported TIFF sample format), and images too small or too thin to analyse (short side under
--min-side px, long side more than --max-aspect times the short side; defaults: the bundle's `images` settings,
else 32 px and 10).

--perturb KIND:LEVEL applies one perturbation of the robustness sweep (morphfuse.perturb: jpeg:Q, downscale:F,
blur:S, noise:S) to every image before detection, and everything is computed and drawn on the perturbed image.

From Python: morphfuse.Detector.from_bundle(BUNDLE)(image) gives the same values for one image (a path or an
H×W×3 uint8 RGB array), without writing files.

Memory: full-size images are taken in batches of at most --batch-pixels pixels (an image larger than that is
processed alone), at most --batch-size images per forward pass; each image's full-size maps are made, written and
freed one image at a time. Peak memory grows with the largest image, not with the number of images.

Exit status: 0 when every input worked, 1 when some inputs could not be used, 2 for a usage problem (a damaged
bundle, an --out in use or holding another run's outputs, a bad option), 3 when an output could not be written
(no space left, read-only, permission; one line naming the file and the cause; rerun to resume), 143 on SIGTERM
and 130 on Ctrl-C (rerun to resume). Scores near 0.5 are uncertain; the models' limitations are in the bundle's
MODEL_CARD.md.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError, sigterm_raises
from .imageio import IMAGE_EXTENSIONS, MAX_ASPECT, MIN_SIDE, AppendLog, BadImageError, csv_line, header_size, \
    prob_to_uint8, read_complete_lines, read_image, unusable_size, walk_tree, is_image_file, write_png, \
    write_text_atomic
from .ledger import Ledger
from .outdir import RunFolder, is_run_folder
from .overlay import heatmap_image, overlay_image
from .textfmt import json_default

log = logging.getLogger(__name__)

STAGE = "detect"
COLUMNS = ["image", "path", "score", "mitl_score", "fake", "n_faces", "mask_fraction", "stamp"]
OWNED = ["masks", "prob", "heatmaps", "overlays", "scores.csv", "scores.json", "ledger.csv"]
BATCH_PIXELS = 1 << 24  # 16.8 Mpx of full-size images at once (about 50 MB of RGB)


# ------------------------------------------------------------------------------------------------- inputs
@dataclass
class InputImage:
    name: str
    path: Path          # as given (or found below a given folder)
    abspath: str = ""   # os.path.abspath(path): the key of a done image in scores.csv
    stamp: str = ""     # "size:mtime_ns" of the file when it was listed


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text``: '/' → '__', anything but ``[A-Za-z0-9._-]`` → '_', no leading dot."""
    s = text.replace("\\", "/").replace("/", "__")
    s = re.sub(r"[^A-Za-z0-9._-]", "_", s).lstrip(".")
    return s or "image"


def _looks_like_detect_output(d: Path) -> bool:
    """A folder written by an older detect (no run record): scores.csv beside masks/ and overlays/."""
    return (d / "scores.csv").is_file() and (d / "masks").is_dir() and (d / "overlays").is_dir()


class Inputs:
    """The images to process, uniquely named, and the ``(path, reason)`` of inputs that cannot be listed.

    Add command-line arguments with :meth:`add_arg` (a file or a folder), single files with :meth:`add_file`.
    ``exclude``: folders never walked (the --out folder); morphfuse output folders are never walked either.
    ``known``: ``{abspath: name}`` of images named by an earlier run into the same --out (they keep their name;
    a new image never takes one of those names).
    """

    def __init__(self, exclude=(), known: dict[str, str] | None = None):
        self.items: list[InputImage] = []
        self.problems: list[tuple[str, str]] = []
        self.known = dict(known or {})
        self.taken: set[str] = set(self.known.values())
        self.seen: set[tuple[int, int]] = set()
        self.exclude: set[tuple[int, int]] = set()
        for d in exclude:
            try:
                st = os.stat(d)
                self.exclude.add((st.st_dev, st.st_ino))
            except OSError:
                continue

    def skip_dir(self, d: Path) -> str | None:
        try:
            st = os.stat(d)
        except OSError:
            return None
        if (st.st_dev, st.st_ino) in self.exclude:
            return "the --out folder"
        if is_run_folder(d) or _looks_like_detect_output(d):
            return "a morphfuse output folder"
        return None

    def add_file(self, path: Path, rel: str) -> None:
        try:
            st = os.stat(path)
        except OSError as e:
            from .imageio import _link_problem

            self.problems.append((str(path), _link_problem(path, e)))
            return
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            return
        self.seen.add(key)
        abspath = os.path.abspath(path)
        name = self.known.get(abspath)
        if name is None:
            stem = rel[: -len(path.suffix)] if path.suffix and rel.endswith(path.suffix) else rel
            name = safe_name(stem)
            if name in self.taken:
                name = safe_name(f"{stem}_{path.suffix.lstrip('.')}") if path.suffix else name
            base, k = name, 2
            while name in self.taken:
                name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        self.items.append(InputImage(name, path, abspath, f"{st.st_size}:{st.st_mtime_ns}"))

    def add_listed(self, root: Path, rels: list[str]) -> None:
        """Paths relative to ``root`` (``--input-list``), named as if found in that folder."""
        for rel in rels:
            path = root / rel
            if path.is_file():
                self.add_file(path, rel)
            else:
                self.problems.append((str(path), "no such file (listed in --input-list)"))

    def add_folder(self, folder: Path) -> None:
        why = self.skip_dir(folder)
        if why:
            log.info("%s: left out (%s)", folder, why)
            return
        w = walk_tree(folder, is_image_file, skip_dir=self.skip_dir)
        for p, reason in w.problems:
            self.problems.append((str(p), reason))
        for p, reason in w.skipped:
            log.info("%s: left out (%s)", p, reason)
        for f in w.files:
            self.add_file(f, f.relative_to(folder).as_posix())

    def add_arg(self, arg: str) -> None:
        p = Path(arg)
        if p.is_dir():
            self.add_folder(p)
        elif p.is_file():
            self.add_file(p, p.name)
        elif os.path.lexists(p):
            self.add_file(p, p.name)  # a dangling or looping link, a pipe: the reason is said there or when read
        else:
            self.problems.append((arg, "no such file or folder"))


def collect_inputs(paths: list[str], exclude=(), known: dict[str, str] | None = None,
                   listed: tuple[Path, list[str]] | None = None) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """The images to process, with unique names, and the ``(path, reason)`` of inputs that cannot be used.
    ``listed``: ``(root, relative paths)`` named as if found in the folder ``root`` (``--input-list``)."""
    inputs = Inputs(exclude, known)
    if listed is not None:
        inputs.add_listed(*listed)
    for arg in paths:
        inputs.add_arg(arg)
    return inputs.items, inputs.problems


def pixel_batches(sized, budget: int, max_images: int):
    """Cut ``(item, pixels)`` pairs, in order, into batches (lists of items) whose pixels sum to at most
    ``budget`` (an image over it alone), at most ``max_images`` each. A generator: it holds one batch."""
    cur: list = []
    total = 0
    for item, n in sized:
        if cur and (total + n > budget or len(cur) >= max_images):
            yield cur
            cur, total = [], 0
        cur.append(item)
        total += n
    if cur:
        yield cur


# ------------------------------------------------------------------------------------------- one image
@dataclass
class Result:
    score: float            # LFDL image score (the release's rule over the face crops)
    mitl_score: float       # MITL score from its full-size mask
    lfdl_prob: np.ndarray   # H×W uint8, round(255·p)
    mitl_prob: np.ndarray   # H×W uint8, round(255·p)
    fused: np.ndarray       # H×W bool


@dataclass
class Detection:
    """What :class:`Detector` says about one image (``det(image)``); the CLI's files hold the same values.

    ``score``: the image score in [0, 1] (LFDL's, as in the paper); ``fake``: ``score >= fake_threshold`` (the
    bundle's ``score_rules.fake_threshold``). ``mask``: the fused mask, H×W bool at the image's size (masks/NAME.png
    is ``255·mask``). ``prob_lfdl`` / ``prob_mitl``: the two probability maps, H×W float32 in [0, 1] at the
    image's size, quantised to 1/255 (the values the mask is fused from, and what prob/NAME_*.png hold; the
    uint8 arrays are ``prob_lfdl_u8`` / ``prob_mitl_u8``). ``faces``: the crop boxes LFDL looked at, ``(x0, y0,
    x1, y1)`` in pixels of the image (end exclusive; the whole image when no face was found). ``n_faces``: faces
    detected. ``mitl_score``: MITL's own score from its map, for comparison. ``threshold``: the mask threshold.
    """

    score: float
    fake: bool
    mask: np.ndarray
    prob_lfdl_u8: np.ndarray
    prob_mitl_u8: np.ndarray
    faces: list
    n_faces: int
    mitl_score: float
    threshold: float
    fake_threshold: float
    variant: str
    crops: list = None  # the Crop records behind ``faces`` (face index and kind of each)

    @property
    def prob_lfdl(self) -> np.ndarray:
        return self.prob_lfdl_u8.astype(np.float32) / np.float32(255)

    @property
    def prob_mitl(self) -> np.ndarray:
        return self.prob_mitl_u8.astype(np.float32) / np.float32(255)

    @property
    def mask_fraction(self) -> float:
        return float(self.mask.mean())


@dataclass
class NetOutput:
    """What the networks give for one image (small arrays): its crops' scores and patch maps, MITL's map."""
    face_scores: np.ndarray  # (n,)
    patch_maps: np.ndarray   # (n, G, G)
    boxes: list              # n × (x0, y0, x1, y1), original px
    mitl_map: np.ndarray     # (M, M)


def as_rgb(image, min_side: int = MIN_SIDE, max_aspect: float = MAX_ASPECT) -> np.ndarray:
    """An H×W×3 uint8 RGB array from a path (str or Path, any format :func:`~morphfuse.imageio.read_image`
    reads) or an array (H×W×3 uint8 RGB; H×W grey is repeated to 3 channels, an alpha channel is dropped).
    ``UserError`` for anything else and for images too small or too thin to analyse."""
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        try:
            rgb = read_image(p)
        except BadImageError as e:
            raise UserError(f"{p}: {e.reason}") from None
        except OSError as e:
            raise UserError(f"{p}: cannot read ({e.strerror or e})") from None
        what = str(p)
    elif isinstance(image, np.ndarray):
        what = "image array"
        if image.dtype != np.uint8:
            raise UserError(f"{what}: dtype {image.dtype}, expected uint8 (RGB values 0-255)")
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        if image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"{what}: shape {image.shape}, expected H×W×3 (RGB)")
        rgb = np.ascontiguousarray(image)
    else:
        raise UserError(f"image of type {type(image).__name__}: expected a path or an H×W×3 uint8 numpy array")
    h, w = rgb.shape[:2]
    why = unusable_size(w, h, min_side, max_aspect)
    if why:
        raise UserError(f"{what}: {why}")
    return rgb


class Detector:
    """The bundle's models and settings: the Python API of ``morphfuse detect``.

      det = morphfuse.Detector.from_bundle("results/demo/bundle")
      r = det("photo.jpg")            # or an H×W×3 uint8 RGB numpy array
      print(r.score, r.fake, r.mask.mean())

    ``det(image)`` runs the whole chain (faces, crops, LFDL, MITL, fusion) on one image and returns a
    :class:`Detection`; :meth:`predict` does it for a batch whose crops are known (:meth:`crops_of`), as the CLI
    does. ``perturb``: a :class:`morphfuse.perturb.Perturbation` (or its text, ``jpeg:50``) applied to every
    image before detection (``--perturb``)."""

    def __init__(self, bundle, device="cpu", variant: str | None = None, kernel: int | None = None,
                 threshold: float | None = None, batch_size: int = 8, perturb=None):
        import torch

        from .faces.backends import get_backend
        from .fusion import VARIANTS, check_kernel
        from .imageio import check_threshold

        meta = bundle.meta
        self.bundle = bundle
        if str(device) == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: torch finds no CUDA device")
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.variant = variant or meta["fusion"].get("variant", "mdmf")
        if self.variant not in VARIANTS:
            raise UserError(f"--variant {self.variant!r}: expected one of {', '.join(VARIANTS)}")
        try:
            self.kernel = check_kernel(int(kernel if kernel is not None else meta["fusion"]["kernel"]))
            self.threshold = check_threshold(threshold if threshold is not None else meta["fusion"]["threshold"])
        except (TypeError, ValueError) as e:
            raise UserError(f"fusion setting: {e}") from None
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: must be >= 1")
        self.batch_size = int(batch_size)
        self.perturbation = _perturbation(perturb)
        self.min_side, self.max_aspect = _image_limits(bundle, None, None)
        self.margin = float(meta["crops"]["margin"])
        self.max_frac = float(meta["crops"]["max_face_area_fraction"])
        # bundles written before the release crop rule was built used the margin rule
        self.crop_rule = str(meta["crops"].get("rule", "margin"))
        self.crop_expand = float(meta["crops"].get("expand", 1.5))
        mitl_rule = meta["score_rules"]["mitl"]
        self.mitl_rule, self.mitl_percent = mitl_rule["rule"], float(mitl_rule["percent"])
        self.fake_threshold = float(meta["score_rules"].get("fake_threshold", 0.5))
        self.lfdl, self.mitl = _models(bundle, self.device)
        self.lfdl_size = int(meta["models"]["lfdl"]["size"])
        self.mitl_size = int(meta["models"]["mitl"]["size"])
        self.backend = get_backend(meta["faces"]["backend"], **(meta["faces"].get("options") or {}))

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, device: str = "cpu", variant: str | None = None,
                    kernel: int | None = None, threshold: float | None = None, batch_size: int = 8,
                    perturb=None, verify: bool = True) -> "Detector":
        """A detector for the bundle folder ``path`` (written by ``morphfuse export``; every file is checked
        against bundle.json's hashes unless ``verify=False``). ``device``: ``cpu``, ``cuda`` or ``auto``;
        ``variant``, ``kernel``, ``threshold``: the fusion settings (default: the bundle's)."""
        from .bundle import load_bundle

        return cls(load_bundle(path, verify=verify), device, variant, kernel, threshold, batch_size, perturb)

    def _run(self, model, arrays: np.ndarray, inputs) -> tuple[np.ndarray, np.ndarray]:
        import torch

        scores, maps = [], []
        for i in range(0, len(arrays), self.batch_size):
            batch = inputs(arrays[i:i + self.batch_size])
            with torch.no_grad():
                s, m = model.predict_proba(batch)
            scores.append(s.float().reshape(-1).cpu().numpy())
            maps.append(m.float()[:, 0].cpu().numpy())
        return np.concatenate(scores), np.concatenate(maps)

    def prepare(self, rgb: np.ndarray, image_id: str = "") -> np.ndarray:
        """The image the networks see: ``rgb`` itself, or ``perturb.apply(rgb, perturbation, seed)`` (same size)
        with the seed :func:`morphfuse.perturb.image_seed` of seed 0, the perturbation and ``image_id`` (the CLI
        passes the image's NAME; only noise uses it)."""
        if self.perturbation is None:
            return rgb
        from .perturb import apply, image_seed

        return apply(rgb, self.perturbation, seed=image_seed(0, self.perturbation, image_id))

    def crops_of(self, rgb: np.ndarray):
        """Faces and adaptive crops of one image (the crops stage's rules)."""
        from .faces.crops import crop_boxes

        faces = self.backend.detect(rgb)
        h, w = rgb.shape[:2]
        return faces, crop_boxes(faces, w, h, self.margin, self.max_frac, rule=self.crop_rule, expand=self.crop_expand)

    def network_outputs(self, images: list[np.ndarray], crops: list[list]) -> list[NetOutput]:
        """The networks on a batch (crops resized to the models' sizes): small outputs per image."""
        from .features import lfdl_inputs_from_rgb, mitl_inputs_from_rgb, resize_image

        low_band = getattr(self.mitl, "low_band", "l_shape")
        flat = [resize_image(rgb[c.y0:c.y1, c.x0:c.x1], self.lfdl_size) for rgb, cs in zip(images, crops) for c in cs]
        face_scores, patch_maps = self._run(
            self.lfdl, np.stack(flat), lambda a: lfdl_inputs_from_rgb(a, self.device, with_srm=False))
        del flat
        whole = np.stack([resize_image(rgb, self.mitl_size) for rgb in images])
        _, mitl_maps = self._run(
            self.mitl, whole, lambda a: mitl_inputs_from_rgb(a, low_band, self.device, with_dct=False))
        out, pos = [], 0
        for k, cs in enumerate(crops):
            out.append(NetOutput(face_scores[pos:pos + len(cs)], patch_maps[pos:pos + len(cs)],
                                 [(c.x0, c.y0, c.x1, c.y1) for c in cs], mitl_maps[k]))
            pos += len(cs)
        return out

    def finish(self, hw: tuple[int, int], net: NetOutput) -> Result:
        """One image's full-size maps and scores from its network outputs (full-size floats freed as soon as they
        are stored as uint8)."""
        from .fusion import fuse_masks
        from .predict import lfdl_image_prob, mitl_image_prob

        score, lfdl_prob = lfdl_image_prob(net.face_scores, net.patch_maps, net.boxes, hw)
        lfdl_u8 = prob_to_uint8(lfdl_prob)
        del lfdl_prob
        mitl_score, mitl_prob = mitl_image_prob(net.mitl_map, hw, self.mitl_rule, self.mitl_percent)
        mitl_u8 = prob_to_uint8(mitl_prob)
        del mitl_prob
        fused = fuse_masks(lfdl_u8, mitl_u8, self.variant, self.kernel, self.threshold)
        return Result(score, mitl_score, lfdl_u8, mitl_u8, fused)

    def detection(self, hw: tuple[int, int], net: NetOutput, faces, crops) -> Detection:
        """The :class:`Detection` of one image from its network outputs, faces and crops."""
        r = self.finish(hw, net)
        score = float(r.score)
        return Detection(score=score, fake=bool(score >= self.fake_threshold), mask=r.fused,
                         prob_lfdl_u8=r.lfdl_prob, prob_mitl_u8=r.mitl_prob,
                         faces=[(int(c.x0), int(c.y0), int(c.x1), int(c.y1)) for c in crops], n_faces=len(faces),
                         mitl_score=float(r.mitl_score), threshold=float(self.threshold),
                         fake_threshold=self.fake_threshold, variant=self.variant, crops=list(crops))

    def predict(self, images: list[np.ndarray], crops: list[list]) -> list[Result]:
        """Scores and masks of images whose crops are known (``crops_of``)."""
        nets = self.network_outputs(images, crops)
        return [self.finish(rgb.shape[:2], n) for rgb, n in zip(images, nets)]

    def __call__(self, image, image_id: str = "") -> Detection:
        """The :class:`Detection` of one image: a path (str or Path) or an H×W×3 uint8 RGB array (see
        :func:`as_rgb`); with ``perturb``, of the perturbed image (``image_id`` seeds noise, see :meth:`prepare`)."""
        rgb = self.prepare(as_rgb(image, self.min_side, self.max_aspect), image_id)
        faces, crops = self.crops_of(rgb)
        net = self.network_outputs([rgb], [crops])[0]
        return self.detection(rgb.shape[:2], net, faces, crops)


def _perturbation(spec):
    """None, or a checked :class:`morphfuse.perturb.Perturbation` from itself or its text (``jpeg:50``); the
    identity (``none``) is None."""
    if spec is None:
        return None
    from . import perturb as P

    p = P.parse(spec) if isinstance(spec, str) else P.check(spec)
    return None if p.kind == "none" else p


_MODELS: dict = {}


def _models(bundle, device):
    """The bundle's two networks in eval mode on ``device``, built once per process for the last bundle used
    (a verified bundle's digest names its weights exactly), so repeated runs in one process skip the build."""
    key = (bundle.digest, str(device))
    if key not in _MODELS:
        _MODELS.clear()
        lfdl = bundle.load_model("lfdl", device)
        mitl = bundle.load_model("mitl", device)  # in eval mode
        if callable(getattr(mitl, "fuse_for_inference", None)):
            mitl.fuse_for_inference()  # AMW block: 3 convs run as 1 (fewer FLOPs; same up to float rounding)
        _MODELS[key] = (lfdl, mitl)
    return _MODELS[key]


def clear_model_cache() -> None:
    """Free the networks kept by :class:`Detector` for the last bundle."""
    _MODELS.clear()


# ------------------------------------------------------------------------------------------ the run folder
def read_rows(out: Path) -> list[dict]:
    """The complete rows of ``out/scores.csv`` (a line cut by a crash is dropped), the last one per image."""
    import csv

    text = read_complete_lines(out / "scores.csv")
    if not text.strip():
        return []
    try:  # as text, converted by Python (float() of a repr is exact): rewritten rows keep their digits
        records = [rec for rec in csv.reader(io.StringIO(text)) if rec]
        if records[0] != COLUMNS:
            raise ValueError(f"columns {', '.join(records[0])}, expected {', '.join(COLUMNS)}")
        last: dict[str, dict] = {}
        for k, rec in enumerate(records[1:], start=2):
            if len(rec) != len(COLUMNS):
                raise ValueError(f"row {k} has {len(rec)} fields, expected {len(COLUMNS)}")
            r = dict(zip(COLUMNS, rec))
            last.pop(r["image"], None)  # the last row of an image, at its place
            last[r["image"]] = r
        return [{"image": r["image"], "path": r["path"], "score": float(r["score"]),
                 "mitl_score": float(r["mitl_score"]), "fake": r["fake"] == "True", "n_faces": int(r["n_faces"]),
                 "mask_fraction": float(r["mask_fraction"]), "stamp": r["stamp"]} for r in last.values()]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{out / 'scores.csv'}: not readable ({' '.join(str(e).split())[:200]}); use --overwrite "
                        "to start this folder anew") from None


def _row_line(row: dict) -> str:
    return csv_line([row[c] for c in COLUMNS])


def _files_of(out: Path, name: str) -> list[Path]:
    return [out / "masks" / f"{name}.png", out / "prob" / f"{name}_lfdl.png", out / "prob" / f"{name}_mitl.png",
            out / "heatmaps" / f"{name}.png", out / "overlays" / f"{name}.png"]


def _remove_orphans(out: Path, names: set[str]) -> int:
    """Remove files of images without a scores.csv row (the image in flight when a run was stopped)."""
    n = 0
    for sub in ("masks", "prob", "heatmaps", "overlays"):
        d = out / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") or not p.name.endswith(".png"):
                continue
            name = p.name[:-4]
            if sub == "prob":
                if not name.endswith(("_lfdl", "_mitl")):
                    continue  # not a file detect writes
                name = name[:-5]
            if name not in names:
                p.unlink(missing_ok=True)
                n += 1
    return n


def _image_limits(bundle, min_side, max_aspect) -> tuple[int, float]:
    images = (bundle.config or {}).get("images") or {}
    ms = int(min_side if min_side is not None else images.get("min_side", MIN_SIDE))
    ma = float(max_aspect if max_aspect is not None else images.get("max_aspect", MAX_ASPECT))
    if ms < 1:
        raise UserError(f"--min-side {ms}: must be at least 1 (px)")
    if not ma >= 1 or math.isinf(ma):
        raise UserError(f"--max-aspect {ma:g}: must be a finite number >= 1")
    return ms, ma


# ---------------------------------------------------------------------------------------------------- run
def detect(inputs: list[str], models: str | os.PathLike, out: str | os.PathLike, variant: str | None = None,
           device: str = "auto", batch_size: int = 8, kernel: int | None = None, threshold: float | None = None,
           progress: bool = True, overwrite: bool = False, batch_pixels: int = BATCH_PIXELS,
           min_side: int | None = None, max_aspect: float | None = None,
           listed: tuple[Path, list[str]] | None = None, perturb: str | None = None) -> dict:
    """Run detection (see the module docstring); returns ``{"rows": [...], "failed": n, "images": n,
    "skipped": n}`` (rows: every image in ``out``, earlier runs' included) and writes everything in ``out``.
    ``listed``: ``(root, relative paths)`` of images named as if found in the folder ``root`` (``--input-list``).
    ``perturb``: ``KIND:LEVEL`` applied to every image before detection (:mod:`morphfuse.perturb`)."""
    import torch

    from .bundle import load_bundle
    from .fusion import VARIANTS, check_kernel
    from .imageio import check_threshold

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch finds no CUDA device")
    dev = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    if batch_pixels < 1:
        raise UserError(f"--batch-pixels {batch_pixels}: must be >= 1")
    pert = _perturbation(perturb)
    bundle = load_bundle(models)
    ms, ma = _image_limits(bundle, min_side, max_aspect)
    v = variant or bundle.meta["fusion"].get("variant", "mdmf")
    if v not in VARIANTS:
        raise UserError(f"--variant {v!r}: expected one of {', '.join(VARIANTS)}")
    try:
        k = check_kernel(int(kernel if kernel is not None else bundle.meta["fusion"]["kernel"]))
        t = check_threshold(threshold if threshold is not None else bundle.meta["fusion"]["threshold"])
    except (TypeError, ValueError) as e:
        raise UserError(f"fusion setting: {e}") from None
    settings = {"bundle_sha256": bundle.digest, "variant": v, "kernel": k, "threshold": t,
                "fake_threshold": float(bundle.meta["score_rules"].get("fake_threshold", 0.5)),
                "min_side": ms, "max_aspect": ma}
    if pert is not None:  # recorded only when given: folders of earlier runs (no perturbation) stay resumable
        settings["perturb"] = pert.spec
    out = Path(out)
    with RunFolder(out, STAGE, settings, OWNED, overwrite=overwrite) as folder, sigterm_raises():
        return _detect_into(folder, inputs, bundle, dev, v, k, t, batch_size, batch_pixels, ms, ma, progress,
                            listed, pert)


def _prepare_folder(folder: RunFolder, by_name: dict) -> None:
    """The folder as it must be before appending: the rows that parsed (a cut line dropped), no file without a
    row, a fresh ledger (failed inputs are tried again), no scores.json until the run completes."""
    out = folder.path
    for sub in ("masks", "prob", "heatmaps", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if folder.resumed:
        write_text_atomic(out / "scores.csv", csv_line(COLUMNS) + "".join(_row_line(r) for r in by_name.values()))
        n_orphans = _remove_orphans(out, set(by_name))
        if n_orphans:
            log.info("detect: removed %d file(s) of an image that an earlier run did not finish", n_orphans)
    (out / "scores.json").unlink(missing_ok=True)


def _progress_bar(total: int, progress: bool):
    """detect's bar on stderr: live on a terminal, a line every 30 s in a log file, none with ``progress`` off."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc="detect", unit="img", file=sys.stderr, disable=not progress,
                mininterval=0.5 if interactive else 30.0, dynamic_ncols=interactive)


def _sized(todo, fail, bar, min_side: int, max_aspect: float):
    """(item, pixels) of the usable inputs, from their headers: batches are cut before decoding; an unreadable
    header or an image too small or thin to analyse is a ledger line (``fail``)."""
    for it in todo:
        try:
            w, h = header_size(it.path)
        except BadImageError as e:
            fail(it.name, it.path, e.reason)
            bar.update(1)
            continue
        why = unusable_size(w, h, min_side, max_aspect)
        if why:
            fail(it.name, it.path, why)
            bar.update(1)
            continue
        yield it, w * h


def _run_settings(bundle, det: "Detector", dev, min_side: int, max_aspect: float, perturbation) -> dict:
    """What made these results (scores.json's ``settings``): the bundle and its hash, fusion, thresholds, device,
    faces and crops, the size limits, the perturbation."""
    return {"bundle": str(bundle.path.resolve()), "bundle_sha256": bundle.digest,
            "config_hash": bundle.meta["config"].get("hash"), "variant": det.variant, "kernel": det.kernel,
            "threshold": det.threshold, "fake_threshold": det.fake_threshold, "image_score": "lfdl",
            "device": dev, "faces": bundle.meta["faces"], "crops": bundle.meta["crops"],
            "min_side": min_side, "max_aspect": max_aspect,
            "perturb": perturbation.spec if perturbation is not None else None}


def _write_scores_json(out: Path, settings: dict, rows: list[dict], failed: list) -> None:
    """scores.json: the run's settings, one entry per image, the failed inputs (written when the run completes)."""
    doc = {"settings": settings, "images": rows, "failed": failed}
    write_text_atomic(out / "scores.json", json.dumps(doc, indent=2, default=json_default) + "\n")


def _detect_into(folder: RunFolder, inputs, bundle, dev, variant, kernel, threshold, batch_size, batch_pixels,
                 min_side, max_aspect, progress, listed=None, perturbation=None) -> dict:
    from tqdm import tqdm

    out = folder.path
    rows = read_rows(out) if folder.resumed else []
    by_name = {r["image"]: r for r in rows}
    known = {r["path"]: r["image"] for r in rows}
    done = {(r["path"], r["stamp"]) for r in rows}
    items, problems = collect_inputs(inputs, exclude=[out], known=known, listed=listed)
    if not items and not problems and listed is None:
        raise UserError(f"no image files found in {', '.join(inputs)} (looked for {' '.join(IMAGE_EXTENSIONS)})")
    todo = [it for it in items if (it.abspath, it.stamp) not in done]
    n_done = len(items) - len(todo)
    if n_done:
        log.info("detect: %d of %d input image(s) already done in %s (same bundle and settings): skipped",
                 n_done, len(items), out)
    _prepare_folder(folder, by_name)
    det = Detector(bundle, dev, variant, kernel, threshold, batch_size, perturbation)
    ledger = Ledger(STAGE).stream_to(out / "ledger.csv")
    scores_log = AppendLog(out / "scores.csv", header=csv_line(COLUMNS).rstrip("\n"))
    bar = _progress_bar(len(todo), progress)

    def fail(name: str, path, reason: str) -> None:
        ledger.add(name, path, reason)
        msg = f"morphfuse detect: skipped {path}: {' '.join(str(reason).split())}"
        if progress:
            tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    n_new = 0
    try:
        for path, reason in problems:
            fail(safe_name(Path(path).stem or path), path, reason)

        for batch in pixel_batches(_sized(todo, fail, bar, min_side, max_aspect), batch_pixels, batch_size):
            ok: list[tuple[InputImage, np.ndarray, list, list]] = []
            for it in batch:
                try:
                    rgb = det.prepare(read_image(it.path), it.name)
                    faces, crops = det.crops_of(rgb)
                except BadImageError as e:
                    fail(it.name, it.path, e.reason)
                    bar.update(1)
                    continue
                except (MemoryError, UserError):
                    raise
                except Exception as e:  # noqa: BLE001 - one odd image must not stop the others
                    log.debug("face detection failed on %s", it.path, exc_info=True)
                    fail(it.name, it.path, f"face detection failed ({type(e).__name__}: {e})")
                    bar.update(1)
                    continue
                ok.append((it, rgb, faces, crops))
            if not ok:
                continue
            nets = det.network_outputs([o[1] for o in ok], [o[3] for o in ok])
            for j, ((it, rgb, faces, crops), net) in enumerate(zip(ok, nets)):
                r = det.detection(rgb.shape[:2], net, faces, crops)
                row = {"image": it.name, "path": it.abspath, "score": r.score, "mitl_score": r.mitl_score,
                       "fake": r.fake, "n_faces": r.n_faces, "mask_fraction": r.mask_fraction, "stamp": it.stamp}
                _write_image_outputs(out, it.name, rgb, r)
                scores_log.append(_row_line(row))  # after the image's files: a row means its files are there
                by_name[it.name] = row
                n_new += 1
                ok[j] = None  # free the full-size image now
                del rgb, r
                bar.update(1)
    finally:
        bar.close()
        scores_log.close()
        ledger.close()

    rows = list(by_name.values())
    if n_new:  # one row per image (a redone image appended a second one)
        write_text_atomic(out / "scores.csv", csv_line(COLUMNS) + "".join(_row_line(r) for r in rows))
    _write_scores_json(out, _run_settings(bundle, det, dev, min_side, max_aspect, perturbation), rows, ledger.rows)
    return {"rows": rows, "failed": ledger.n_errors, "images": len(items) + len(problems), "skipped": n_done,
            "new": n_new}


def _write_image_outputs(out: Path, name: str, rgb, r: Detection) -> None:
    """The four files of one image, each atomically; on any failure the ones already written are removed, so
    an image is in --out completely or not at all."""
    import cv2

    masks, lfdl, mitl, heat, ov = _files_of(out, name)
    written = []
    try:
        for path, arr in ((masks, r.mask), (lfdl, r.prob_lfdl_u8), (mitl, r.prob_mitl_u8)):
            write_png(path, arr)
            written.append(path)
        write_png(heat, heatmap_image(r.prob_lfdl_u8, r.prob_mitl_u8, r.threshold))
        written.append(heat)
        r.prob_lfdl_u8 = r.prob_mitl_u8 = None  # written: free them before the overlay (a full-size colour image)
        img = overlay_image(rgb, r.mask, r.crops, r.score, r.mitl_score, r.fake, r.n_faces, r.variant,
                            r.threshold, r.fake_threshold)
        write_png(ov, cv2.cvtColor(img, cv2.COLOR_RGB2BGR, dst=img), bgr=True)  # in place: no second copy
        written.append(ov)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------- CLI
def _positive_int(text: str) -> int:
    try:
        v = int(float(text)) if re.fullmatch(r"\d+(\.0*)?|\d+(\.\d*)?e\d+", text.strip(), re.I) else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .fusion import VARIANTS

    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--input-list", metavar="TXT", help="also the files listed here (one path a line, relative to "
                   "--input-root), named as when found in that folder (the workflow's bulk target)")
    p.add_argument("--input-root", metavar="DIR", help="folder of the --input-list paths (default: the list's)")
    p.add_argument("--models", required=True, metavar="BUNDLE",
                   help="model bundle folder written by `morphfuse export` (checked against its hashes)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (masks/, prob/, overlays/, scores)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds another run's outputs (other bundle or settings): remove them first "
                        "(without it such an --out is refused)")
    p.add_argument("--variant", choices=VARIANTS, default=None,
                   help="mask fusion: mdmf (default: the bundle's), closing_or, naive_or, or one branch alone "
                        "(lfdl, mitl)")
    p.add_argument("--kernel", type=int, default=None, help="fusion kernel side, odd (default: the bundle's)")
    p.add_argument("--threshold", type=float, default=None,
                   help="mask probability threshold (default: the bundle's, 0.5)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the networks run (default: auto = cuda if available)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="at most this many images (and face crops) per forward pass (8)")
    p.add_argument("--batch-pixels", type=_positive_int, default=BATCH_PIXELS, metavar="PIXELS",
                   help=f"at most this many pixels of full-size images held at once (default {BATCH_PIXELS}, "
                        "16.8 Mpx); a larger image is processed alone. Peak memory follows the largest image")
    p.add_argument("--min-side", type=_positive_int, default=None, metavar="PX",
                   help=f"images whose short side is smaller are too small to analyse (default: the bundle's "
                        f"images.min_side, else {MIN_SIDE})")
    p.add_argument("--max-aspect", type=float, default=None, metavar="RATIO",
                   help=f"images whose long side is more than RATIO times the short side are too thin to analyse "
                        f"(default: the bundle's images.max_aspect, else {MAX_ASPECT:g})")
    p.add_argument("--perturb", default=None, metavar="KIND:LEVEL",
                   help="perturb every image before detection, as the robustness sweep does: jpeg:Q (re-encode at "
                        "quality Q), downscale:F (shrink by F and back), blur:S (Gaussian, sigma S px), noise:S "
                        "(Gaussian, sigma S of 255; seeded by the image's NAME). Recorded in the run settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    listed = None
    if args.input_list:
        lst = Path(args.input_list)
        if not lst.is_file():
            raise UserError(f"--input-list {lst}: no such file")
        listed = (Path(args.input_root) if args.input_root else lst.parent,
                  [line for line in lst.read_text().splitlines() if line.strip()])
    elif not args.inputs:
        raise UserError("give images or folders, or --input-list")
    res = detect(args.inputs, args.models, args.out, variant=args.variant, device=args.device,
                 batch_size=args.batch_size, kernel=args.kernel, threshold=args.threshold,
                 progress=not args.no_progress, overwrite=args.overwrite, batch_pixels=args.batch_pixels,
                 min_side=args.min_side, max_aspect=args.max_aspect, listed=listed, perturb=args.perturb)
    n_fake = sum(bool(r["fake"]) for r in res["rows"])
    log.info("detect: %d input(s): %d processed now, %d already done, %d failed; %d image(s) in %s (%d called "
             "fake)", res["images"], res["new"], res["skipped"], res["failed"], len(res["rows"]), args.out, n_fake)
    if res["failed"]:
        print(f"morphfuse detect: {res['failed']} input(s) could not be used; see {Path(args.out) / 'ledger.csv'}",
              file=sys.stderr)
        return 1
    return 0
