"""Face detectors and landmark models behind one interface (CONTRACTS.md, "Faces").

``get_backend(name, **options)`` returns a :class:`FaceBackend` whose ``detect(rgb)`` gives a list of
:class:`Face` (box, score, landmarks in original pixels), largest box first. Backends:

| name | detector | landmarks | score |
|---|---|---|---|
| ``dlib`` (default) | HOG + linear SVM (``dlib.get_frontal_face_detector``) | 68, dlib's shape predictor | SVM margin |
| ``mtcnn`` | facenet-pytorch MTCNN (weights ship in its wheel) | 5 (eyes, nose, mouth corners) | probability |
| ``opencv`` | Haar frontal-face cascade (``cv2.data.haarcascades``) | none | the cascade's last-stage weight |
| ``face_alignment`` | S3FD (``detector="sfd"``) or ``dlib``/``mtcnn``/``opencv`` boxes | 68, FAN | the detector's |

Conventions:
- Boxes are ``(x0, y0, x1, y1)`` float pixel edges (dlib's inclusive ``right``/``bottom`` become ``+1``). They
  are NOT clipped: a face cut by the image border may have a box that reaches past it (crops clip).
- Landmarks are ``(K, 2)`` float32 ``x, y`` (pixel centres at integers), K = 68 or 5, or ``None``.
- Faces are sorted by box area, largest first (ties: higher score first).
- ``min_score``: faces are kept when ``score > min_score``, on top of the detector's own threshold; ``None``
  (default) keeps whatever the detector returns. The score's scale is the backend's (see the table). For ``dlib``
  it is also passed as ``adjust_threshold``, so a negative value lowers dlib's own threshold.
- Nothing is ever downloaded. dlib's and MTCNN's models are installed files; ``face_alignment`` needs its weight
  files in ``{torch_home}/hub/checkpoints/`` and raises :class:`UserError` naming any that is missing.
- Backends are built on first request and cached per process (``get_backend`` with the same options returns the
  same object); importing this module loads no model and imports no detector library.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from ..errors import UserError

BACKENDS = ("dlib", "mtcnn", "opencv", "face_alignment")
FA_DETECTORS = ("sfd", "dlib", "mtcnn", "opencv")


@dataclass
class Face:
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 in original pixels
    score: float
    landmarks: np.ndarray | None = None      # (K, 2) float32 x,y in original pixels; K = 68 (dlib, FAN) or 5 (MTCNN)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class FaceBackend(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Face]: ...


def _sorted(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: (-f.area, -f.score))


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"detect() expects an H×W×3 uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _keep(score: float, min_score: float | None) -> bool:
    return min_score is None or score > min_score


def _check_min_score(backend: str, min_score) -> float | None:
    if min_score is None:
        return None
    try:
        return float(min_score)
    except (TypeError, ValueError):
        raise UserError(f"face backend {backend!r}: min_score must be a number or null, got {min_score!r}") from None


# ------------------------------------------------------------------------------------------------------- dlib
def dlib_predictor_path() -> Path:
    """Where face-recognition-models keeps dlib's 68-point shape predictor (found without importing the package:
    its ``__init__`` needs ``pkg_resources``, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc) / "models" / "shape_predictor_68_face_landmarks.dat"
        if p.is_file():
            return p
    raise UserError("dlib's 68-point landmark model shape_predictor_68_face_landmarks.dat was not found: install "
                    "the face-recognition-models package (scripts/install.sh does) or pass predictor_path")


_DLIB_MODELS: dict[str, object] = {}


def _dlib_model(kind: str, path: Path | None = None):
    """dlib's detector and shape predictors, loaded once per process and shared by every dlib-based backend."""
    import dlib

    key = f"{kind}:{path}"
    if key not in _DLIB_MODELS:
        _DLIB_MODELS[key] = dlib.get_frontal_face_detector() if kind == "hog" else dlib.shape_predictor(str(path))
    return _DLIB_MODELS[key]


class DlibBackend:
    """dlib HOG detector + 68-point shape predictor.

    ``upsample``: image doublings before detection. 0 finds faces whose box is ≳ 70 px, 1 down to ≈ 40 px at
    about 3.5× the cost (measured on London Set faces shrunk on a 512-px canvas; benchmarks/bench_faces.py).
    ``gray``: run the HOG detector on a grey copy (about 1.35× faster; on the London Set it finds the same faces,
    mean box IoU 0.99 with colour); landmarks are always predicted on the colour image.
    """

    name = "dlib"

    def __init__(self, upsample: int = 1, min_score: float | None = None, gray: bool = False,
                 predictor_path: str | os.PathLike | None = None):
        if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) or upsample < 0:
            raise UserError(f"face backend 'dlib': upsample must be an integer >= 0, got {upsample!r}")
        self.upsample = int(upsample)
        self.min_score = _check_min_score(self.name, min_score)
        self.gray = bool(gray)
        path = Path(predictor_path) if predictor_path else dlib_predictor_path()
        if not path.is_file():
            raise UserError(f"face backend 'dlib': shape predictor {path} does not exist")
        self._detector = _dlib_model("hog")
        self._predictor = _dlib_model("shape", path.resolve())

    def detect_boxes(self, rgb: np.ndarray) -> list:
        """``[(dlib.rectangle, score)]`` above the threshold, detector order."""
        rgb = _as_rgb(rgb)
        img = rgb
        if self.gray:
            import cv2

            img = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        adjust = self.min_score if self.min_score is not None else 0.0
        rects, scores, _ = self._detector.run(img, self.upsample, adjust)
        return [(r, float(s)) for r, s in zip(rects, scores) if _keep(float(s), self.min_score)]

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = _as_rgb(rgb)
        faces = []
        for rect, score in self.detect_boxes(rgb):
            shape = self._predictor(rgb, rect)
            lm = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            box = (float(rect.left()), float(rect.top()), float(rect.right() + 1), float(rect.bottom() + 1))
            faces.append(Face(box, score, lm))
        return _sorted(faces)


# ------------------------------------------------------------------------------------------------------ MTCNN
class MtcnnBackend:
    """facenet-pytorch's MTCNN (P/R/O-Net weights are files inside the installed package).

    Landmarks: 5 points in MTCNN's order (eye on the image's left, eye on its right, nose tip, left and right
    mouth corners). ``thresholds`` are MTCNN's three stage thresholds; ``min_face_size`` in pixels.
    """

    name = "mtcnn"

    def __init__(self, min_score: float | None = None, device: str = "cpu", min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as e:
            raise UserError(f"face backend 'mtcnn' needs facenet-pytorch ({e}); run scripts/install.sh") from None
        import torch

        self.min_score = _check_min_score(self.name, min_score)
        self._torch = torch
        self._net = MTCNN(keep_all=True, device=torch.device(device), min_face_size=int(min_face_size),
                          thresholds=list(thresholds), post_process=False, select_largest=True)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = _as_rgb(rgb)
        if min(rgb.shape[:2]) < 12:  # below P-Net's 12-px window MTCNN has nothing to scan (and errors)
            return []
        with self._torch.no_grad():
            boxes, probs, points = self._net.detect(rgb, landmarks=True)
        if boxes is None:
            return []
        faces = []
        for box, prob, pts in zip(boxes, probs, points):
            if prob is None or not _keep(float(prob), self.min_score):
                continue
            lm = np.asarray(pts, dtype=np.float32).reshape(5, 2)
            faces.append(Face(tuple(float(c) for c in box), float(prob), lm))
        return _sorted(faces)


# ----------------------------------------------------------------------------------------------------- OpenCV
class OpenCVBackend:
    """OpenCV's Haar frontal-face cascade: boxes only, no landmarks.

    Score: the cascade's last-stage weight (``detectMultiScale3(..., outputRejectLevels=True)``); true faces on the
    London Set score 5–13, its false positives -0.02–3.1, so ``min_score`` 4 is a sensible filter. Without
    landmarks the SSPSL nose rectangle is estimated from the box (``landmarks.nose_box_from_face_box``).
    """

    name = "opencv"

    def __init__(self, min_score: float | None = None, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_size: int = 30, cascade: str | os.PathLike | None = None):
        import cv2

        self._cv2 = cv2
        self.min_score = _check_min_score(self.name, min_score)
        path = Path(cascade) if cascade else Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        if not path.is_file():
            raise UserError(f"face backend 'opencv': Haar cascade {path} does not exist (OpenCV 5 no longer ships "
                            "them: install opencv-python-headless<5 or pass cascade)")
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise UserError(f"face backend 'opencv': {path} is not a readable Haar cascade")
        self.scale_factor, self.min_neighbors, self.min_size = float(scale_factor), int(min_neighbors), int(min_size)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        gray = self._cv2.cvtColor(_as_rgb(rgb), self._cv2.COLOR_RGB2GRAY)
        rects, _, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size), outputRejectLevels=True)
        faces = []
        for (x, y, w, h), weight in zip(np.reshape(rects, (-1, 4)), np.ravel(weights)):
            if _keep(float(weight), self.min_score):
                faces.append(Face((float(x), float(y), float(x + w), float(y + h)), float(weight), None))
        return _sorted(faces)


# --------------------------------------------------------------------------------------------- face_alignment
def resolve_torch_home(torch_home: str | os.PathLike | None = None) -> Path:
    """``torch_home`` if given, else ``$TORCH_HOME``, else torch's default (``~/.cache/torch``)."""
    if torch_home:
        return Path(torch_home).expanduser()
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return Path(xdg) / "torch"


def face_alignment_weight_files(detector: str = "sfd") -> dict[str, tuple[str, str]]:
    """``{role: (file name, URL)}`` of the weight files the installed face-alignment loads, read from its own
    source so that they follow its version: the 2-D FAN, plus S3FD when it is the detector."""
    from face_alignment import api

    fan_url = api.models_urls["2DFAN-4"]
    files = {"fan": (os.path.basename(fan_url.split("?")[0]), fan_url)}
    if detector == "sfd":
        from face_alignment.detection.sfd import sfd_detector

        sfd_url = sfd_detector.models_urls["s3fd"]
        files["s3fd"] = (os.path.basename(sfd_url.split("?")[0]), sfd_url)
    return files


class FaceAlignmentBackend:
    """face-alignment 1.5 (Bulat & Tzimiropoulos): 2-D FAN, 68 landmarks, offline only.

    Weights: ``{torch_home}/hub/checkpoints/2DFAN4-11f355bf06.pth.tar`` (a ``torch.load`` state dict of
    ``face_alignment.models.FAN(4)``) and, for ``detector="sfd"``, ``s3fd-619a316812.pth`` (a state dict of its
    S3FD net). Both are checked before anything is built; a missing one raises :class:`UserError` saying where to
    put it. The library's own loader (which downloads what it lacks) is replaced, while the model is built, by one
    that only returns those checked local files, so this adapter cannot download.

    ``detector``: ``sfd`` (face-alignment's S3FD, probability scores) or ``dlib`` | ``mtcnn`` | ``opencv``, in
    which case that backend's boxes and scores are used and FAN only predicts the landmarks (face-alignment's
    own "boxes supplied by the caller" path; no detector weights needed). ``upsample`` is passed to a dlib
    detector. ``flip_input``: also run FAN on the mirrored crop and average (the library's default; 2× cost).
    ``torch.compile`` is off (its one-time compile and on-disk cache cost more than they save for one shard).
    """

    name = "face_alignment"

    def __init__(self, torch_home: str | os.PathLike | None = None, device: str = "cpu", detector: str = "sfd",
                 min_score: float | None = None, upsample: int = 1, flip_input: bool = True):
        if detector not in FA_DETECTORS:
            raise UserError(f"face backend 'face_alignment': detector must be one of {', '.join(FA_DETECTORS)}, "
                            f"got {detector!r}")
        if not any(k in str(device) for k in ("cpu", "cuda", "mps")):
            raise UserError(f"face backend 'face_alignment': device must be cpu, cuda[:N] or mps, got {device!r}")
        try:
            import face_alignment
            from face_alignment import api
        except ImportError as e:
            raise UserError(f"face backend 'face_alignment' needs the face-alignment package and its imports "
                            f"(numba, scikit-image): {e}") from None
        import torch

        self.min_score = _check_min_score(self.name, min_score)
        self.detector = detector
        self.device = str(device)
        self.torch_home = resolve_torch_home(torch_home)
        checkpoints = self.torch_home / "hub" / "checkpoints"
        expected = face_alignment_weight_files(detector)
        files = {role: checkpoints / fname for role, (fname, _) in expected.items()}
        for role, (fname, url) in expected.items():
            if not files[role].is_file():
                raise UserError(
                    f"face backend 'face_alignment': weight file {fname} is missing from {checkpoints}. morphfuse "
                    f"never downloads weights: fetch it on a machine with network access ({url}) and put it there, "
                    "or point faces.face_alignment.torch_home (CLI --torch-home) at a directory whose "
                    f"hub/checkpoints/ holds it")

        def local_only(url, *args, **kwargs):
            fname = os.path.basename(str(url).split("?")[0])
            path = checkpoints / fname
            if not path.is_file():
                raise UserError(f"face backend 'face_alignment': face-alignment asked for {url}; put {fname} in "
                                f"{checkpoints} (nothing is downloaded)")
            return str(path)

        landmarks_type = getattr(face_alignment.LandmarksType, "TWO_D", None) or face_alignment.LandmarksType._2D
        kwargs = dict(device=self.device, flip_input=bool(flip_input), compile=False, verbose=False)
        if detector == "sfd":
            threshold = 0.5 if self.min_score is None else max(0.5, self.min_score)
            kwargs.update(face_detector="sfd",
                          face_detector_kwargs={"path_to_detector": str(files["s3fd"]), "filter_threshold": threshold})
            self._boxes_from = None
        else:
            kwargs.update(face_detector="folder")  # a no-op detector: the boxes come from our own backend
            options = {"min_score": min_score}
            if detector == "dlib":
                options["upsample"] = upsample
            self._boxes_from = get_backend(detector, **options)
        original = api.load_file_from_url
        api.load_file_from_url = local_only
        try:
            self._fa = face_alignment.FaceAlignment(landmarks_type, **kwargs)
        except UserError:
            raise
        except Exception as e:  # a truncated download, a Git LFS pointer, a state dict of another version ...
            raise UserError(f"face backend 'face_alignment': could not load the weights in {checkpoints} "
                            f"({type(e).__name__}: {e})") from None
        finally:
            api.load_file_from_url = original
        self._torch = torch

    def _boxes(self, rgb: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        if self._boxes_from is not None:
            return [(f.box, f.score) for f in self._boxes_from.detect(rgb)]
        out = []
        for b in self._fa.face_detector.detect_from_image(rgb.copy()):
            b = np.asarray(b, dtype=np.float64).ravel()
            score = float(b[4]) if b.size > 4 else 1.0
            if _keep(score, self.min_score):
                out.append(((float(b[0]), float(b[1]), float(b[2]), float(b[3])), score))
        return out

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = _as_rgb(rgb)
        boxes = self._boxes(rgb)
        if not boxes:
            return []
        detected = [np.array([*box, score], dtype=np.float64) for box, score in boxes]  # float32 breaks FA's crop()
        with self._torch.no_grad():
            landmarks = self._fa.get_landmarks_from_image(rgb, detected_faces=detected)
        faces = [Face(box, score, np.asarray(lm, dtype=np.float32)[:, :2].reshape(68, 2))
                 for (box, score), lm in zip(boxes, landmarks)]
        return _sorted(faces)


# ---------------------------------------------------------------------------------------------------- factory
_FACTORIES = {"dlib": DlibBackend, "mtcnn": MtcnnBackend, "opencv": OpenCVBackend,
              "face_alignment": FaceAlignmentBackend}
_CACHE: dict[tuple, FaceBackend] = {}


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def backend_options(name: str) -> list[str]:
    """The option names ``get_backend(name, ...)`` accepts."""
    if name not in _FACTORIES:
        raise UserError(f"unknown face backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return [p for p in inspect.signature(_FACTORIES[name].__init__).parameters if p != "self"]


def weight_dir(faces: Mapping) -> str | None:
    """The local folder of weights the configured backend reads (face_alignment's ``torch_home``), or None: a rule
    input of every stage that detects faces, so that replacing the weights reruns them."""
    return faces["face_alignment"]["torch_home"] if faces["backend"] == "face_alignment" else None


def options_from_config(faces: Mapping) -> tuple[str, dict]:
    """``(backend name, options)`` of a config's ``faces:`` block: top-level keys (``upsample``, ``min_score``,
    ``gray``) go to the backends that take them; a block named after the backend (``face_alignment:``) adds its
    own options."""
    name = faces["backend"]
    allowed = backend_options(name)
    opts = {k: faces[k] for k in ("upsample", "min_score", "gray") if k in allowed and k in faces}
    own = faces[name] if name in faces else {}
    opts.update({k: v for k, v in dict(own).items() if k in allowed})
    return name, opts


def backend_from_config(faces: Mapping) -> FaceBackend:
    """The face backend of a config's ``faces:`` block: the one builder every stage uses (faces, forge, detect)."""
    name, opts = options_from_config(faces)
    return get_backend(name, **opts)


def get_backend(name: str, **options) -> FaceBackend:
    """The backend ``name`` built with ``options``; built once per process and options, then reused."""
    allowed = backend_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"face backend {name!r} has no option {', '.join(map(repr, unknown))}; "
                        f"its options are {', '.join(allowed)}")
    key = (name, _freeze(options))
    backend = _CACHE.get(key)
    if backend is None:
        backend = _CACHE[key] = _FACTORIES[name](**options)
    return backend


def clear_cache() -> None:
    """Forget every built backend (tests; freeing a model's memory)."""
    _CACHE.clear()
