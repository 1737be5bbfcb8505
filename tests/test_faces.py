"""Face backends, landmark regions and the `morphfuse faces` stage, on the London Set photos.

Ground truth: london_full/*.tem hold 189 hand-placed landmarks per 1350×1350 photo; points 0 and 1 are the pupil
centres (image left, image right). london_512 holds the same photos at 512×512, so .tem coordinates × 512/1350.
The face_alignment adapter runs its real code path on stand-in weight files (random FAN, a hand-made S3FD) in a
temporary TORCH_HOME; nothing is downloaded.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphfuse.errors import UserError
from morphfuse.faces import backends as B
from morphfuse.faces.backends import get_backend
from morphfuse.faces.landmarks import hull_mask, nose_box_from_face_box, region_box, region_points
from morphfuse.imageio import read_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
FULL = DATA / "london_full"
L512 = DATA / "london_512"
STEMS = ["001_03", "022_03", "061_03", "113_03"]   # four people of the London Set (neutral, frontal)

pytestmark = pytest.mark.skipif(not FULL.is_dir(), reason="London Set photos not present")


def pupils(stem: str, size: int = 512) -> np.ndarray:
    """(2, 2) pupil centres from the .tem file, scaled from 1350 px to ``size``."""
    pts = np.loadtxt(FULL / f"{stem}.tem", skiprows=1, max_rows=2)
    return pts * size / 1350.0


def photo(stem: str) -> np.ndarray:
    return read_image(L512 / "neutral_front" / f"{stem}.jpg")


def inside(box, pts) -> bool:
    x0, y0, x1, y1 = box
    return bool(np.all((pts[:, 0] > x0) & (pts[:, 0] < x1) & (pts[:, 1] > y0) & (pts[:, 1] < y1)))


def eye_centres_68(lm: np.ndarray) -> np.ndarray:
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0)])


# ------------------------------------------------------------------------------------------------------ dlib
@pytest.mark.parametrize("stem", STEMS)
def test_dlib_one_face_box_holds_pupils_and_eyes_match(stem):
    faces = get_backend("dlib", upsample=0).detect(photo(stem))
    assert len(faces) == 1
    f = faces[0]
    truth = pupils(stem)
    iod = np.linalg.norm(truth[1] - truth[0])
    assert inside(f.box, truth)
    assert f.score > 0
    assert f.landmarks.shape == (68, 2) and f.landmarks.dtype == np.float32
    # the 68-point eye contours' centres are within 10 % of the inter-pupil distance of the hand-placed pupils
    assert np.linalg.norm(eye_centres_68(f.landmarks) - truth, axis=1).max() < 0.1 * iod


def test_dlib_full_resolution_needs_no_scaling():
    stem = STEMS[0]
    faces = get_backend("dlib", upsample=0).detect(read_image(FULL / f"{stem}.jpg"))
    assert len(faces) == 1
    truth = pupils(stem, 1350)
    assert inside(faces[0].box, truth)
    iod = np.linalg.norm(truth[1] - truth[0])
    assert np.linalg.norm(eye_centres_68(faces[0].landmarks) - truth, axis=1).max() < 0.1 * iod


def test_dlib_upsample_and_gray_find_the_same_face():
    rgb = photo(STEMS[1])
    a = get_backend("dlib", upsample=0).detect(rgb)
    b = get_backend("dlib", upsample=0, gray=True).detect(rgb)
    c = get_backend("dlib", upsample=1).detect(rgb)
    assert len(a) == len(b) == len(c) == 1
    for other in (b, c):
        assert inside(other[0].box, pupils(STEMS[1]))


def test_dlib_min_score_filters():
    assert get_backend("dlib", upsample=0, min_score=50.0).detect(photo(STEMS[0])) == []


def test_faces_sorted_by_area_largest_first():
    import cv2

    big, small = photo(STEMS[0]), cv2.resize(photo(STEMS[1]), (300, 300), interpolation=cv2.INTER_AREA)
    canvas = np.full((512, 830, 3), 128, np.uint8)
    canvas[106:406, :300] = small          # small face on the left: detector order would put it first
    canvas[:, 318:] = big
    faces = get_backend("dlib", upsample=0).detect(canvas)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].box[0] > 318 and faces[1].box[2] < 300


def test_blank_and_tiny_images_have_no_face():
    det = get_backend("dlib", upsample=0)
    assert det.detect(np.zeros((64, 48, 3), np.uint8)) == []
    assert det.detect(np.zeros((1, 1, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        det.detect(np.zeros((8, 8), np.uint8))


# ------------------------------------------------------------------------------------------- mtcnn, opencv
@pytest.fixture()
def one_thread():
    """torch on one thread: on a shared 2-core machine a second intra-op thread costs 4x the CPU time."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("stem", STEMS[:2])
def test_mtcnn_finds_the_face_and_its_eyes(stem, one_thread):
    faces = get_backend("mtcnn").detect(photo(stem))
    assert len(faces) == 1
    f = faces[0]
    truth = pupils(stem)
    assert inside(f.box, truth)
    assert 0.9 < f.score <= 1.0
    assert f.landmarks.shape == (5, 2) and f.landmarks.dtype == np.float32
    # MTCNN's first two points are the eye centres, image-left first
    assert np.linalg.norm(f.landmarks[:2] - truth, axis=1).max() < 0.1 * np.linalg.norm(truth[1] - truth[0])
    assert get_backend("mtcnn").detect(np.zeros((8, 8, 3), np.uint8)) == []


@pytest.mark.parametrize("stem", STEMS[:2])
def test_opencv_finds_the_face_without_landmarks(stem):
    rgb = photo(stem)
    faces = get_backend("opencv").detect(rgb)
    assert len(faces) == 1
    f = faces[0]
    assert inside(f.box, pupils(stem))
    assert f.landmarks is None and f.score > 4
    # the geometric nose estimate overlaps dlib's 68-point nose
    nose = region_box(get_backend("dlib", upsample=0).detect(rgb)[0].landmarks, "nose", 0)
    assert iou(nose_box_from_face_box(f.box), nose) > 0.5


# --------------------------------------------------------------------------------------- factory and cache
def test_get_backend_caches_and_validates():
    assert get_backend("dlib", upsample=0) is get_backend("dlib", upsample=0)
    assert get_backend("dlib", upsample=0) is not get_backend("dlib", upsample=1)
    with pytest.raises(UserError, match="unknown face backend 'retina'"):
        get_backend("retina")
    with pytest.raises(UserError, match="no option 'upsampel'.*upsample"):
        get_backend("dlib", upsampel=1)
    with pytest.raises(UserError, match="upsample must be an integer >= 0"):
        get_backend("dlib", upsample=-1)
    with pytest.raises(UserError, match="detector must be one of"):
        get_backend("face_alignment", detector="yolo")


def test_importing_faces_loads_no_detector_library():
    code = ("import sys, morphfuse.faces.backends, morphfuse.faces.landmarks, morphfuse.faces.cli, "
            "morphfuse.faces.crops; bad = {'dlib', 'torch', 'face_alignment', 'facenet_pytorch'} & "
            "set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ landmarks
def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_region_box_68_uses_the_region_indices():
    lm = np.stack([np.arange(68), 1000 + np.arange(68)], 1).astype(np.float32)
    assert region_box(lm, "nose", 0) == (27.0, 1027.0, 35.0, 1035.0)
    assert region_box(lm, "mouth", 5) == (43.0, 1043.0, 72.0, 1072.0)
    assert region_box(lm, "eyes", 0) == (36.0, 1036.0, 47.0, 1047.0)
    assert region_box(lm, "face", 1) == (-1.0, 999.0, 68.0, 1068.0)
    assert region_box(lm.ravel().tolist(), "nose", 0) == (27.0, 1027.0, 35.0, 1035.0)  # parquet's flat list
    assert region_box(None, "nose", 5) is None and region_box(np.zeros(0), "nose", 5) is None
    with pytest.raises(ValueError, match="region"):
        region_box(lm, "ears", 0)
    with pytest.raises(ValueError, match=r"\(68, 2\) or \(5, 2\)"):
        region_box(np.zeros((10, 2)), "nose", 0)


def test_region_box_5_point_template_is_symmetric_and_rotates():
    # eyes 100 px apart on y = 0, nose 50 px below their midpoint, mouth corners 40 px either side at y = 100
    lm5 = np.array([[-50, 0], [50, 0], [0, 50], [-40, 100], [40, 100]], float)
    x0, y0, x1, y1 = region_box(lm5, "nose", 0)
    assert x0 == pytest.approx(-21) and x1 == pytest.approx(21) and y0 == pytest.approx(-6) and y1 == pytest.approx(72)
    x0, y0, x1, y1 = region_box(lm5, "mouth", 2)
    assert (x0, x1) == (-42, 42) and y0 == pytest.approx(100 - 14 - 2) and y1 == pytest.approx(100 + 18 + 2)
    x0, y0, x1, y1 = region_box(lm5, "eyes", 0)
    assert (x0, x1) == pytest.approx((-70, 70)) and (y0, y1) == pytest.approx((-8, 6.5))
    # a face rolled by 90°: the template turns with it
    rot = lm5[:, ::-1] * [-1, 1]
    bx = region_box(rot, "mouth", 0)
    assert bx[1] == pytest.approx(-40) and bx[3] == pytest.approx(40)


def test_5_point_regions_agree_with_68_point_regions():
    # the 5 points MTCNN would give (eye centres, nose tip, mouth corners), taken from dlib's 68
    ious = {r: [] for r in ("nose", "mouth", "eyes", "face")}
    for stem in STEMS + ["033_03"]:
        lm = get_backend("dlib", upsample=0).detect(photo(stem))[0].landmarks
        lm5 = np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])
        for region in ious:
            ious[region].append(iou(region_box(lm5, region, 0), region_box(lm, region, 0)))
    for region, v in ious.items():   # the mouth varies most (lip height vs corners: sd 0.05-0.09 d)
        assert np.mean(v) > 0.6 and min(v) > 0.4, (region, v)


def test_hull_mask_fills_the_hull_and_forehead_goes_up():
    # a square of 68 points (jaw on the bottom/sides, brows along the top edge, chin at the bottom middle)
    lm = np.zeros((68, 2))
    lm[:17] = np.stack([np.linspace(20, 80, 17), np.full(17, 80.0)], 1)
    lm[17:27] = np.stack([np.linspace(20, 80, 10), np.full(10, 40.0)], 1)
    lm[8] = (50, 80)
    lm[27:] = (50, 60)
    m = hull_mask(lm, (120, 100))
    assert m.dtype == bool and m.shape == (120, 100)
    assert m[60, 50] and not m[30, 50] and not m[90, 50]
    assert abs(int(m.sum()) - 61 * 41) <= 2 * (61 + 41)
    f = hull_mask(lm, (120, 100), forehead=True)
    assert (f | m).sum() == f.sum()        # the forehead hull contains the plain hull
    added = f & ~m
    assert added.any() and np.nonzero(added)[0].max() <= 40   # every added pixel is at or above the brows
    # brows to chin = 40 px, 0.4 of it = 16 px above the brows
    assert np.nonzero(f[:, 50])[0].min() == pytest.approx(24, abs=1)
    assert not hull_mask(None, (10, 10)).any()


def test_hull_mask_5_points_and_out_of_image_points():
    lm5 = np.array([[40, 40], [60, 40], [50, 55], [42, 70], [58, 70]], float)
    m, f = hull_mask(lm5, (100, 100)), hull_mask(lm5, (100, 100), forehead=True)
    assert m[50, 50] and f.sum() > m.sum() and np.nonzero(f)[0].min() < 40
    big = hull_mask(np.array([[-50, -50], [150, -50], [150, 150], [-50, 150], [50, 50]], float), (100, 100))
    assert big.all()


def test_region_points_of_5_and_68():
    assert region_points(np.zeros((68, 2)), "mouth").shape == (20, 2)
    assert region_points(np.array([[0, 0], [10, 0], [5, 5], [2, 10], [8, 10]], float), "face").shape == (4, 2)


# ------------------------------------------------------------------------------------------- face_alignment
def _stand_in_weights(torch_home: Path, s3fd_box=(40.0, 50.0, 100.0, 110.0)) -> None:
    """Write stand-ins under face-alignment's own file names: FAN(4) with random weights, and an S3FD whose
    features are constant and whose only confident anchor (first cell of its coarsest level) decodes to
    ``s3fd_box`` (its prior: centre 64,64, side 512; variances 0.1/0.2)."""
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    ck = torch_home / "hub" / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    files = B.face_alignment_weight_files("sfd")
    torch.manual_seed(0)
    fan = {k: (v.half() if v.is_floating_point() else v) for k, v in FAN(4).state_dict().items()}
    torch.save(fan, ck / files["fan"][0])

    net_sd = s3fd().state_dict()
    sd = {}
    for k, v in net_sd.items():   # zero convolutions (stored as 1-element views) and unit biases: features are 1
        sd[k] = torch.zeros(()).expand(v.shape) if v.dim() == 4 else torch.ones(v.shape)
    for head in ("conv3_3_norm_mbox", "conv4_3_norm_mbox", "conv5_3_norm_mbox", "fc7_mbox", "conv6_2_mbox",
                 "conv7_2_mbox"):
        conf = torch.zeros(net_sd[head + "_conf.bias"].shape)
        conf[-1] = -20.0                                   # "face" far below "background" everywhere ...
        sd[head + "_conf.bias"], sd[head + "_loc.bias"] = conf, torch.zeros(4)
    w = torch.zeros(net_sd["conv7_2_mbox_conf.weight"].shape)
    w[1, :, 0, 1] = w[1, :, 1, 0] = -1.0                   # ... except where the taps above and left see padding
    sd["conv7_2_mbox_conf.weight"], sd["conv7_2_mbox_conf.bias"] = w, torch.tensor([0.0, 20.0])
    cx, cy, side = (s3fd_box[0] + s3fd_box[2]) / 2, (s3fd_box[1] + s3fd_box[3]) / 2, s3fd_box[2] - s3fd_box[0]
    sd["conv7_2_mbox_loc.bias"] = torch.tensor([(cx - 64) / 51.2, (cy - 64) / 51.2,
                                                math.log(side / 512) / 0.2, math.log(side / 512) / 0.2])
    torch.save(sd, ck / files["s3fd"][0])


@pytest.fixture(scope="module")
def face_alignment_lib():
    if "face_alignment" not in sys.modules:
        # Import face-alignment with numba's JIT off: its two @jit helpers then run as plain Python, which saves
        # ~9 s of LLVM compilation per test session and computes the same numbers. Scoped to this import.
        numba_config = pytest.importorskip("numba.core.config")
        before = numba_config.DISABLE_JIT
        numba_config.DISABLE_JIT = True
        try:
            return pytest.importorskip("face_alignment")
        finally:
            numba_config.DISABLE_JIT = before
    return sys.modules["face_alignment"]


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory, face_alignment_lib):
    th = tmp_path_factory.mktemp("torch_home")
    _stand_in_weights(th)
    return th


@pytest.fixture()
def no_download(monkeypatch, face_alignment_lib):
    import torch.hub
    import face_alignment.utils
    from face_alignment.detection.sfd import sfd_detector

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(face_alignment.utils, "download_url_to_file", refuse)
    monkeypatch.setattr(sfd_detector, "load_state_dict_from_url", refuse)


def test_face_alignment_missing_weights_is_a_user_error(tmp_path, no_download, monkeypatch):
    monkeypatch.delenv("TORCH_HOME", raising=False)
    with pytest.raises(UserError) as e:
        get_backend("face_alignment", torch_home=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "2DFAN4-11f355bf06.pth.tar" in msg and str(tmp_path / "empty" / "hub" / "checkpoints") in msg
    assert "torch_home" in msg and "never downloads" in msg
    # the FAN is there but not S3FD
    ck = tmp_path / "th" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "2DFAN4-11f355bf06.pth.tar").write_bytes(b"")
    with pytest.raises(UserError, match="s3fd-619a316812.pth is missing"):
        get_backend("face_alignment", torch_home=str(tmp_path / "th"))
    # a file that is not a state dict (a Git LFS pointer, say): a UserError too, not a traceback
    (ck / "2DFAN4-11f355bf06.pth.tar").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(UserError, match="could not load the weights"):
        get_backend("face_alignment", torch_home=str(tmp_path / "th"), detector="opencv")
    assert not list((tmp_path / "empty").glob("**/*.pth*"))   # nothing was fetched


def test_face_alignment_sfd_path_with_stand_in_models(torch_home, no_download, one_thread):
    import cv2

    rgb = cv2.resize(photo(STEMS[0]), (160, 160), interpolation=cv2.INTER_AREA)
    fa = get_backend("face_alignment", torch_home=str(torch_home), detector="sfd", flip_input=False)
    faces = fa.detect(rgb)
    assert len(faces) == 1
    f = faces[0]
    assert f.box == pytest.approx((40, 50, 100, 110), abs=1e-3) and f.score == pytest.approx(1.0)
    assert f.landmarks.shape == (68, 2) and f.landmarks.dtype == np.float32 and np.isfinite(f.landmarks).all()
    # FAN's crop: centre of the box (shifted up 12 % of its height), side 200·(w + h)/195 px
    side = 200 * 120 / 195
    cx, cy = 70, 80 - 0.12 * 60
    assert np.all(np.abs(f.landmarks - [cx, cy]) <= side / 2 + 2)
    assert get_backend("face_alignment", torch_home=str(torch_home), detector="sfd", flip_input=False) is fa


def test_face_alignment_with_dlib_boxes(torch_home, no_download, one_thread):
    rgb = photo(STEMS[0])
    ref = get_backend("dlib", upsample=0).detect(rgb)
    faces = get_backend("face_alignment", torch_home=str(torch_home), detector="dlib", upsample=0,
                        flip_input=False).detect(rgb)
    assert len(faces) == len(ref) == 1
    assert faces[0].box == ref[0].box and faces[0].score == ref[0].score   # dlib's box and score ...
    assert faces[0].landmarks.shape == (68, 2)                              # ... FAN's 68 points
    assert not np.array_equal(faces[0].landmarks, ref[0].landmarks)
    assert get_backend("face_alignment", torch_home=str(torch_home), detector="dlib", upsample=0,
                       flip_input=False).detect(np.zeros((40, 40, 3), np.uint8)) == []


# ------------------------------------------------------------------------------------------------------- CLI
def make_manifest(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "x").mkdir(parents=True)
    rows = []
    for stem in STEMS[:3]:
        rows.append({"image_id": f"london__{stem}", "root": str(L512), "path": f"neutral_front/{stem}.jpg",
                     "width": 512, "height": 512})
    data = (L512 / "neutral_front" / f"{STEMS[3]}.jpg").read_bytes()
    (root / "x" / "broken.jpg").write_bytes(data[: len(data) // 3])   # a truncated JPEG
    rows.append({"image_id": "tmp__broken", "root": str(root), "path": "x/broken.jpg", "width": 512, "height": 512})
    shutil.copy(L512 / "lisa" / "lisa1.jpg", root / "x" / "lisa1.jpg")  # 384x512, but the row says 512x512
    rows.append({"image_id": "tmp__wrong_size", "root": str(root), "path": "x/lisa1.jpg", "width": 512, "height": 512})
    for r in rows:
        r.update(label=0, mask_path="", source="london", method="real", group=r["image_id"][-6:-3],
                 source_groups="", source_ids="", split="train", shard="s00000")
    path = tmp_path / "s00000.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def test_cli_faces_end_to_end(tmp_path, capsys):
    from morphfuse.cli import main
    from morphfuse.faces.cli import read_faces

    manifest = make_manifest(tmp_path)
    out, ledger = tmp_path / "faces" / "s00000.parquet", tmp_path / "ledger" / "faces" / "s00000.csv"
    rc = main(["faces", "--manifest", str(manifest), "--out", str(out), "--ledger", str(ledger),
               "--backend", "dlib", "--upsample", "0", "--min-score", "0"])
    assert rc == 0
    assert "img" in capsys.readouterr().err          # the progress bar went to stderr
    df = read_faces(out)
    assert list(df["image_id"]) == [f"london__{s}" for s in STEMS[:3]]
    assert (df["face_idx"] == 0).all() and (df["n_landmarks"] == 68).all() and (df["backend"] == "dlib").all()
    assert all(len(v) == 136 and v.dtype == np.float32 for v in df["landmarks"])
    for rec in df.to_dict("records"):
        assert inside((rec["x0"], rec["y0"], rec["x1"], rec["y1"]), pupils(rec["image_id"][-6:]))
    import pyarrow.parquet as pq

    assert str(pq.read_schema(out).field("landmarks").type) == "list<element: float>"
    led = pd.read_csv(ledger)
    assert list(led["image_id"]) == ["tmp__broken", "tmp__wrong_size"]
    assert (led["stage"] == "faces").all()
    assert "truncated" in led["reason"][0] or "corrupt" in led["reason"][0]
    assert "384x512" in led["reason"][1]
    assert not list(out.parent.glob(".*tmp*"))       # atomic write left no temporary file


def test_cli_faces_user_errors(tmp_path, capsys):
    from morphfuse.cli import main

    pd.DataFrame({"image_id": ["a"], "path": ["a.jpg"]}).to_parquet(tmp_path / "m.parquet")
    rc = main(["faces", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "f.parquet"),
               "--ledger", str(tmp_path / "l.csv")])
    assert rc == 2 and "lacks the column(s) root" in capsys.readouterr().err
    rc = main(["faces", "--manifest", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "f.parquet"),
               "--ledger", str(tmp_path / "l.csv")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_cli_faces_empty_shard_writes_typed_empty_files(tmp_path):
    from morphfuse.cli import main
    import pyarrow.parquet as pq

    pd.DataFrame({"image_id": pd.Series([], dtype=str), "root": pd.Series([], dtype=str),
                  "path": pd.Series([], dtype=str)}).to_parquet(tmp_path / "m.parquet")
    rc = main(["faces", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "f.parquet"),
               "--ledger", str(tmp_path / "l.csv"), "--backend", "opencv", "--no-progress"])
    assert rc == 0
    schema = pq.read_schema(tmp_path / "f.parquet")
    assert pq.read_table(tmp_path / "f.parquet").num_rows == 0
    assert str(schema.field("landmarks").type).startswith("list")
    assert list(pd.read_csv(tmp_path / "l.csv").columns) == ["stage", "image_id", "path", "reason"]
