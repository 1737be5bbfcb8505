"""The Python API (issue 13 item 2): ``morphfuse.Detector.from_bundle(path)``; ``det(image)`` on a numpy image or a
path gives the same values as ``morphfuse detect`` writes, with the real networks at size 64 (the bundle of
test_export_detect.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, london
from morphfuse.cli import main
from morphfuse.errors import UserError
from morphfuse.imageio import read_gray, read_image


@pytest.fixture(scope="module")
def det(bundle):
    import morphfuse

    return morphfuse.Detector.from_bundle(bundle, device="cpu")


def test_import_morphfuse_is_cheap_and_the_api_is_lazy():
    code = ("import sys, morphfuse; heavy = [m for m in ('numpy', 'torch', 'cv2', 'PIL', 'pandas') if m in "
            "sys.modules]; assert not heavy, heavy; D = morphfuse.Detector; assert 'torch' not in sys.modules; "
            "from morphfuse.detect import Detector; assert D is Detector; assert 'Detector' in dir(morphfuse); "
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    import morphfuse

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        morphfuse.Nope  # noqa: B018


def test_the_lazy_api_does_not_make_every_stage_depend_on_detect():
    """The package names its API modules as strings (PEP 562); the code hashes must not follow them, or editing
    fusion.py would rerun the index and training stages."""
    from morphfuse.hashing import stage_closure

    assert "morphfuse.detect" not in stage_closure("index") and "morphfuse.fusion" not in stage_closure("config")
    assert "morphfuse.fusion" not in stage_closure("train")
    assert {"morphfuse.detect", "morphfuse.fusion"} <= stage_closure("detect")


def test_detector_on_a_numpy_image_and_on_a_path_matches_the_cli(det, bundle, tmp_path):
    photo = london(1)[0]
    rgb = read_image(photo)
    h, w = rgb.shape[:2]
    r = det(rgb)
    assert isinstance(r.score, float) and 0.0 <= r.score <= 1.0
    assert r.fake == (r.score >= det.fake_threshold)
    assert r.mask.shape == (h, w) and r.mask.dtype == bool
    for p in (r.prob_lfdl, r.prob_mitl):
        assert p.shape == (h, w) and p.dtype == np.float32 and 0.0 <= p.min() <= p.max() <= 1.0
    assert r.n_faces == 1 and len(r.faces) == 1
    x0, y0, x1, y1 = r.faces[0]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    # LFDL's map is zero outside the face crops (it only looks at faces)
    outside = np.ones((h, w), bool)
    outside[y0:y1, x0:x1] = False
    assert r.prob_lfdl[outside].max() == 0.0 and r.prob_lfdl[~outside].max() > 0.0
    # The mask is the fusion of the two maps at the bundle's settings (independent call of fuse_masks).
    from morphfuse.fusion import fuse_masks

    assert np.array_equal(r.mask, fuse_masks(r.prob_lfdl_u8, r.prob_mitl_u8, "mdmf", det.kernel, det.threshold))

    # A path gives the same result as the array
    rp = det(photo)
    assert rp.score == r.score and np.array_equal(rp.mask, r.mask) and np.array_equal(rp.prob_mitl, r.prob_mitl)
    assert det(str(photo)).score == r.score

    # ... and as the CLI (the same Detector inside): scores.csv, masks/, prob/
    out = tmp_path / "out"
    assert main(["detect", str(photo), "--models", str(bundle), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    row = pd.read_csv(out / "scores.csv").iloc[0]
    assert row["score"] == pytest.approx(r.score, abs=1e-12) and bool(row["fake"]) == r.fake
    assert row["mitl_score"] == pytest.approx(r.mitl_score, abs=1e-12) and row["n_faces"] == r.n_faces
    assert row["mask_fraction"] == pytest.approx(r.mask.mean(), abs=1e-12)
    assert np.array_equal(read_gray(out / "masks" / f"{photo.stem}.png") == 255, r.mask)
    assert np.array_equal(read_gray(out / "prob" / f"{photo.stem}_lfdl.png"), r.prob_lfdl_u8)
    assert np.array_equal(read_gray(out / "prob" / f"{photo.stem}_mitl.png"), r.prob_mitl_u8)
    assert np.allclose(r.prob_lfdl * 255, r.prob_lfdl_u8, atol=1e-3)
    heat = read_image(out / "heatmaps" / f"{photo.stem}.png")  # the maps for the eye, in viridis
    from morphfuse.overlay import heatmap_image

    assert np.array_equal(heat, heatmap_image(r.prob_lfdl_u8, r.prob_mitl_u8, r.threshold))
    assert read_image(out / "overlays" / f"{photo.stem}.png").shape == rgb.shape
    doc = json.loads((out / "scores.json").read_text())
    assert doc["images"][0]["score"] == pytest.approx(r.score, abs=1e-12)


def test_detector_grey_and_rgba_arrays_and_bad_inputs(det, tmp_path):
    rgb = read_image(london(2)[1])
    r = det(rgb)
    grey = rgb[..., 1].copy()
    g = det(grey)  # grey is repeated to 3 channels: equal to detecting that RGB image
    assert g.score == det(np.repeat(grey[..., None], 3, axis=2)).score
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    assert det(rgba).score == r.score  # alpha dropped
    with pytest.raises(UserError, match="dtype float32, expected uint8"):
        det(rgb.astype(np.float32))
    with pytest.raises(UserError, match=r"shape \(8, 8, 2\)"):
        det(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(UserError, match="too small"):
        det(np.zeros((16, 20, 3), np.uint8))
    with pytest.raises(UserError, match="too thin"):
        det(np.zeros((40, 500, 3), np.uint8))
    with pytest.raises(UserError, match="expected a path or an H×W×3 uint8"):
        det([[1, 2, 3]])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="bad.jpg"):
        det(bad)
    with pytest.raises(UserError, match="nope.png"):
        det(tmp_path / "nope.png")


def test_from_bundle_settings_and_errors(bundle, tmp_path):
    from morphfuse import Detector

    d = Detector.from_bundle(bundle, threshold=0.9, kernel=3, variant="naive_or")
    assert (d.threshold, d.kernel, d.variant) == (0.9, 3, "naive_or")
    with pytest.raises(UserError, match="not a folder"):
        Detector.from_bundle(tmp_path / "none")
    with pytest.raises(UserError, match="--variant 'nope'"):
        Detector.from_bundle(bundle, variant="nope")


# ------------------------------------------------------------------------------------------- start-up (item 8)
FORBIDDEN_ON_DETECT = ("diffusers", "snakemake", "matplotlib", "pandas", "pyarrow", "sklearn", "seaborn")


def test_detect_on_one_image_imports_no_workflow_or_plotting_package(bundle, tmp_path):
    """A real `morphfuse detect` on one image, in a fresh process: none of the packages only the workflow's other
    stages need is imported (scipy is: transformers imports it for its loss functions)."""
    probe = ("import json, runpy, sys\n"
             "sys.argv = ['morphfuse'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('morphfuse', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('MODULES ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
             "sys.exit(code)\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", probe, "detect", str(london(1)[0]), "--models", str(bundle), "--out",
                        str(out), "--device", "cpu", "--no-progress"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(pd.read_csv(out / "scores.csv")) == 1  # it did detect
    mods = set(json.loads(next(x for x in r.stdout.splitlines() if x.startswith("MODULES "))[8:]))
    assert {"torch", "timm", "dlib", "morphfuse"} <= mods  # the probe sees what ran
    assert not mods & set(FORBIDDEN_ON_DETECT), sorted(mods & set(FORBIDDEN_ON_DETECT))


def test_networks_built_without_random_init_equal_the_ordinary_build(bundle):
    """Bundle.load_model builds on the meta device and assigns the file's tensors: same weights, same outputs as
    building (random init) and loading the state dict."""
    import torch

    from morphfuse.bundle import load_bundle
    from morphfuse.training.checkpoint import _meta_tensors, build_from_record

    b = load_bundle(bundle)
    for name in ("lfdl", "mitl"):
        fast = b.load_model(name)
        slow = build_from_record(b.record(name), b.model_file(name)).eval()
        assert not _meta_tensors(fast)
        sf, ss = fast.state_dict(), slow.state_dict()
        assert sf.keys() == ss.keys() and all(torch.equal(sf[k], ss[k]) for k in sf)
        torch.manual_seed(0)
        size = b.meta["models"][name]["size"]
        x = torch.rand(1, 3, size, size)
        inp = __import__("morphfuse.features", fromlist=["x"])
        rgb = (x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)[None]
        if name == "lfdl":
            batch = inp.lfdl_inputs_from_rgb(rgb, torch.device("cpu"), with_srm=False)
        else:
            batch = inp.mitl_inputs_from_rgb(rgb, getattr(slow, "low_band", "l_shape"), torch.device("cpu"),
                                             with_dct=False)
        with torch.no_grad():
            (s1, m1), (s2, m2) = fast.predict_proba(batch), slow.predict_proba(batch)
        assert torch.equal(s1, s2) and torch.equal(m1, m2)


# ----------------------------------------------------------------------------------------- --perturb (issue 16)
@pytest.mark.parametrize("spec", ["jpeg:50", "noise:7"])
def test_detect_perturb_equals_detection_on_the_perturbed_image(det, bundle, tmp_path, spec, capsys):
    from morphfuse import perturb as P

    photo = london(3)[2]
    rgb = read_image(photo)
    p = P.parse(spec)
    out = tmp_path / "out"
    assert main(["detect", str(photo), "--models", str(bundle), "--out", str(out), "--device", "cpu",
                 "--no-progress", "--perturb", spec]) == 0
    row = pd.read_csv(out / "scores.csv").iloc[0]
    # the image perturbed by morphfuse.perturb directly (noise: seeded by the image's NAME), then detected
    direct = det(P.apply(rgb, p, seed=P.image_seed(0, p, photo.stem)))
    assert row["score"] == pytest.approx(direct.score, abs=1e-12)
    assert row["mitl_score"] == pytest.approx(direct.mitl_score, abs=1e-12)
    assert np.array_equal(read_gray(out / "prob" / f"{photo.stem}_mitl.png"), direct.prob_mitl_u8)
    # ... and differs from detection on the clean image
    clean = det(rgb)
    assert (clean.score, clean.mitl_score) != (direct.score, direct.mitl_score)
    assert not np.array_equal(clean.prob_mitl_u8, direct.prob_mitl_u8)
    # the API does the same with perturb=
    from morphfuse import Detector

    api = Detector.from_bundle(bundle, perturb=spec)(rgb, image_id=photo.stem)
    assert api.score == direct.score and np.array_equal(api.mask, direct.mask)
    # recorded in the run settings: another --perturb (or none) into the same --out is refused
    doc = json.loads((out / "scores.json").read_text())
    assert doc["settings"]["perturb"] == p.spec
    capsys.readouterr()
    other = "blur:2" if spec != "blur:2" else "jpeg:50"
    for extra in (["--perturb", other], []):
        assert main(["detect", str(photo), "--models", str(bundle), "--out", str(out), "--device", "cpu",
                     "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert "another run" in err and "perturb" in err


def test_detect_perturb_bad_spec_is_a_one_line_error(bundle, tmp_path, capsys):
    photo = london(1)[0]
    assert main(["detect", str(photo), "--models", str(bundle), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--no-progress", "--perturb", "jpeg:500"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "jpeg:500" in err[0] and "quality must be in [1, 100]" in err[0]
    assert not (tmp_path / "o").exists()
