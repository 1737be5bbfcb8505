"""SD inpainting and diffusion inversion (forge/diffusion.py) on tiny, randomly initialised diffusers pipelines.

The pipelines are built from configs, saved with ``save_pretrained`` into a temporary directory and loaded back by
the module's own offline loader, so the real code path runs on a CPU in seconds. The tokenizer is a real (tiny)
byte-level CLIP BPE tokenizer built from a vocabulary written here: nothing is downloaded.
The photo is a London Set face (cropped around the face, downscaled to 64 px), landmarks from dlib's 68-point model.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from morphfuse.errors import UserError  # noqa: E402
from morphfuse.forge import diffusion as D  # noqa: E402
from morphfuse.forge.common import ForgeResult, rng_for  # noqa: E402
from morphfuse.imageio import read_image  # noqa: E402

PHOTO = Path("/work/shared/data/faces/london_512/neutral_front/001_03.jpg")
SIDE = 64


# ============================================================================================ fixtures
def _tiny_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in alphabet:
        vocab[c] = len(vocab)
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)


def _components(in_channels: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(  # 4 levels: scale factor 8 as in Stable Diffusion (64 px -> 8x8 latents)
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=SIDE)
    tok = _tiny_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=24, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """{"inpaint": dir of a 9-channel SD inpainting pipeline, "t2i": dir of a 4-channel SD text-to-image one}."""
    from diffusers import (DDIMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline)

    torch.set_num_threads(1)   # the test machine is shared
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                 steps_offset=1)
    root = tmp_path_factory.mktemp("models")
    StableDiffusionInpaintPipeline(scheduler=DDIMScheduler(clip_sample=False, **sched),
                                   **_components(9)).save_pretrained(root / "inpaint")
    StableDiffusionPipeline(scheduler=PNDMScheduler(skip_prk_steps=True, **sched),   # as SD 1.5 ships it
                            **_components(4)).save_pretrained(root / "t2i")
    return {"inpaint": str(root / "inpaint"), "t2i": str(root / "t2i")}


def _dlib_face(rgb: np.ndarray):
    """(box, 68 landmarks) of the largest face: our backend if present, else dlib directly."""
    try:
        from morphfuse.faces.backends import get_backend

        faces = get_backend("dlib").detect(rgb)
        if faces and faces[0].landmarks is not None and len(faces[0].landmarks) == 68:
            return np.asarray(faces[0].box, float), np.asarray(faces[0].landmarks, float)
    except ImportError:
        pass
    dlib = pytest.importorskip("dlib")
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        pytest.skip("no dlib 68-point shape predictor (face_recognition_models) installed")
    model = Path(spec.origin).parent / "models" / "shape_predictor_68_face_landmarks.dat"
    rects = dlib.get_frontal_face_detector()(rgb, 1)
    assert rects, "dlib finds no face in the London photo"
    r = max(rects, key=lambda r: r.width() * r.height())
    shape = dlib.shape_predictor(str(model))(rgb, r)
    return (np.array([r.left(), r.top(), r.right(), r.bottom()], float),
            np.array([[p.x, p.y] for p in shape.parts()], float))


@pytest.fixture(scope="module")
def photo():
    """A 64 px square crop around the face of a real London Set photo, with its scaled dlib landmarks."""
    from PIL import Image

    if not PHOTO.exists():
        pytest.skip(f"{PHOTO} not available")
    rgb = read_image(PHOTO)
    box, lm = _dlib_face(rgb)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = 0.9 * max(box[2] - box[0], box[3] - box[1])
    x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
    x1, y1 = int(min(rgb.shape[1], cx + half)), int(min(rgb.shape[0], cy + half))
    crop = rgb[y0:y1, x0:x1]
    small = np.asarray(Image.fromarray(crop).resize((SIDE, SIDE), Image.Resampling.LANCZOS))
    sx, sy = SIDE / crop.shape[1], SIDE / crop.shape[0]
    lm_s = (lm - [x0, y0]) * [sx, sy]
    face = SimpleNamespace(box=((box[0] - x0) * sx, (box[1] - y0) * sy, (box[2] - x0) * sx, (box[3] - y0) * sy),
                           score=1.0, landmarks=lm_s.astype(np.float32))
    return small, face


TARGET = {"image_id": "london_001_03", "group": "001", "split": "train"}


def _check(res, rgb, face, region_forehead=True):
    assert isinstance(res, ForgeResult), res
    res.validate(rgb.shape[:2])
    assert res.fake_rgb.shape == rgb.shape and res.fake_rgb.dtype == np.uint8
    assert res.source_ids == [TARGET["image_id"]] and res.source_groups == [TARGET["group"]]
    region = D.region_mask(face.landmarks, rgb.shape[:2], res.extra["region"], forehead=region_forehead)
    assert res.mask.any()
    np.testing.assert_array_equal(res.mask, region)                      # mask = the region
    np.testing.assert_array_equal(res.fake_rgb[~res.mask], rgb[~res.mask])  # fake == original outside it
    assert (res.fake_rgb[res.mask] != rgb[res.mask]).any()               # and something changed inside
    assert res.extra["prompt"] in D.PROMPTS[res.extra["region"]]


# ============================================================================================ config errors
@pytest.mark.parametrize("factory,key", [(D.make_sd_inpaint, "sd_inpaint"),
                                         (D.make_diffusion_inversion, "diffusion_inversion")])
def test_model_dir_missing_is_a_clear_user_error(tmp_path, factory, key):
    with pytest.raises(UserError, match=rf"forge\.{key}\.model_dir is not set: .*LOCAL diffusers pipeline"):
        factory({"model_dir": None})
    with pytest.raises(UserError, match=rf"forge\.{key}\.model_dir = .*nope.* is not a directory"):
        factory({"model_dir": str(tmp_path / "nope")})
    with pytest.raises(UserError, match=r"has no model_index\.json"):
        factory({"model_dir": str(tmp_path)})
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", '
                                               '"UNet2DConditionModel"]}')
    with pytest.raises(UserError, match=r"cannot load a diffusers"):
        factory({"model_dir": str(tmp_path), "device": "cpu"})


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match=r"forge\.sd_inpaint\.regions .*hair"):
        D.make_sd_inpaint({"model_dir": "x", "regions": ["hair"]})
    with pytest.raises(UserError, match=r"forge\.diffusion_inversion\.sampler"):
        D.make_diffusion_inversion({"model_dir": "x", "sampler": "euler"})
    with pytest.raises(UserError, match=r"steps must be >= 2 with sampler belm"):
        D.make_diffusion_inversion({"model_dir": "x", "sampler": "belm", "steps": 1})
    sdxl = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(addition_embed_type="text_time", in_channels=4)))
    with pytest.raises(UserError, match="SDXL-style"):
        D.DiffusionInversionGenerator(sdxl, {"model_dir": "sdxl"})


# ============================================================================================ regions
def test_region_masks_follow_the_landmarks(photo):
    rgb, face = photo
    hw = rgb.shape[:2]
    masks = {r: D.region_mask(face.landmarks, hw, r) for r in D.REGIONS}
    assert all(m.any() for m in masks.values())
    for part in ("nose", "mouth", "eyes"):
        assert masks[part].sum() < masks["face"].sum()
        assert (masks[part] & masks["face"]).sum() > 0.8 * masks[part].sum()
    import cv2

    n_eyes, _ = cv2.connectedComponents(masks["eyes"].astype(np.uint8))
    assert n_eyes - 1 == 2                                              # two eyes, not the bridge between them
    lm = face.landmarks
    ys, xs = np.nonzero(masks["mouth"])
    assert lm[48:60, 1].min() - 3 <= ys.mean() <= lm[48:60, 1].max() + 3


# ============================================================================================ BELM maths
def _alpha_bar(n: int) -> list[float]:
    """Noise levels with a non-uniform σ̄ grid (variable steps)."""
    sig = [0.05 + 2.0 * (i / n) ** 1.5 for i in range(n + 1)]
    return [1.0 / (1.0 + s * s) for s in sig]


def test_belm_inversion_is_exact_for_any_eps():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 6)) / 3

    def eps(x, i):   # a nonlinear noise predictor that depends on the level
        return np.tanh(w @ x) * (1 + 0.1 * i) + np.sin(x)

    ab = _alpha_bar(12)
    x0 = rng.normal(size=6)
    traj = D.belm_invert(x0, eps, ab)
    assert len(traj) == 13
    rec = D.belm_sample(traj[-1], traj[-2], eps, ab)
    np.testing.assert_allclose(rec, x0, rtol=0, atol=1e-9)
    # and every intermediate level is retraced (the blend hook sees x_i)
    seen = {}
    D.belm_sample(traj[-1], traj[-2], eps, ab, blend=lambda x, i: seen.setdefault(i, x))
    for i in range(11):
        np.testing.assert_allclose(seen[i], traj[i], atol=1e-9)


def test_belm_sampler_is_second_order():
    """dx̄/dσ̄ = cos(σ̄): from the exact (x_N, x_{N-1}), x_0's error falls ~4x per halving of the steps."""
    def run(n):
        ab = _alpha_bar(n)
        sig = [math.sqrt(1 - a) / math.sqrt(a) for a in ab]
        exact = [math.sin(s) * math.sqrt(a) for s, a in zip(sig, ab)]   # x = √ᾱ x̄, x̄ = sin(σ̄)
        rec = D.belm_sample(np.array(exact[-1]), np.array(exact[-2]), lambda x, i: math.cos(sig[i]), ab)
        return abs(float(rec) - exact[0])

    e1, e2 = run(40), run(80)
    assert 3.0 < e1 / e2 < 5.0, (e1, e2)


# ============================================================================================ SD inpainting
def test_sd_inpaint_tiny_pipeline(model_dirs, photo):
    rgb, face = photo
    opts = {"model_dir": model_dirs["inpaint"], "steps": 2, "size": SIDE, "regions": list(D.REGIONS),
            "paste_back": True, "device": "cpu"}
    gen = D.make_sd_inpaint(opts)
    assert gen.method == "sd_inpaint" and not gen.needs_donors
    results = [gen(TARGET, rgb, [face], rng_for(7, gen.method, TARGET["image_id"], k), opts) for k in range(3)]
    for res in results:
        _check(res, rgb, face)
    assert len({res.extra["region"] for res in results}) >= 2             # regions drawn per image
    a = results[0]
    b = gen(TARGET, rgb, [face], rng_for(7, gen.method, TARGET["image_id"], 0), opts)
    assert a.fake_rgb.tobytes() == b.fake_rgb.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    c = gen(
        TARGET, rgb, [face], rng_for(8, gen.method, TARGET["image_id"], 0), {**opts, "regions": [a.extra["region"]]}
    )
    assert c.fake_rgb.tobytes() != a.fake_rgb.tobytes()                  # another seed, another forgery

    # paste_back off: the mask is every changed pixel (the VAE round trip touches the whole image)
    res = gen(TARGET, rgb, [face], rng_for(7, gen.method, TARGET["image_id"], 0), {**opts, "paste_back": False})
    res.validate(rgb.shape[:2])
    np.testing.assert_array_equal(res.mask, np.any(res.fake_rgb != rgb, axis=2))
    assert res.mask.sum() > a.mask.sum()

    # no landmarks: a skip with a reason, not an exception
    skip = gen(TARGET, rgb, [SimpleNamespace(box=face.box, score=1.0, landmarks=None)], rng_for(7, "x", "y"), opts)
    assert isinstance(skip, D.Skip) and "landmarks" in skip.reason


def test_sd_inpaint_with_prompt_embeddings(model_dirs, photo):
    """The encode_prompt path: prompt embeddings instead of the pipeline's tokenizer."""
    rgb, face = photo
    calls = []

    def encode(prompt):
        calls.append(prompt)
        g = torch.Generator().manual_seed(len(prompt))
        return torch.randn(1, 24, 32, generator=g)

    opts = {"model_dir": model_dirs["inpaint"], "steps": 2, "size": SIDE, "regions": ["mouth"], "device": "cpu"}
    gen = D.make_sd_inpaint(opts, encode_prompt=encode)
    res = gen(TARGET, rgb, [face], rng_for(0, gen.method, TARGET["image_id"]), opts)
    _check(res, rgb, face)
    assert res.extra["prompt"] in calls and "" in calls                   # prompt and the negative (CFG)


# ============================================================================================ diffusion inversion
@pytest.mark.parametrize("which,sampler", [("t2i", "ddim"), ("t2i", "belm"), ("inpaint", "belm")])
def test_diffusion_inversion_tiny_pipeline(model_dirs, photo, which, sampler):
    rgb, face = photo
    opts = {"model_dir": model_dirs[which], "steps": 2, "sampler": sampler, "device": "cpu"}
    gen = D.make_diffusion_inversion(opts)
    assert gen.inpaint_unet == (which == "inpaint")
    a = gen(TARGET, rgb, [face], rng_for(3, gen.method, TARGET["image_id"]), opts)
    _check(a, rgb, face)
    assert a.extra["sampler"] == sampler and a.extra["model_hw"] == (SIDE, SIDE)
    b = gen(TARGET, rgb, [face], rng_for(3, gen.method, TARGET["image_id"]), opts)
    assert a.fake_rgb.tobytes() == b.fake_rgb.tobytes()


def test_belm_reconstructs_the_latents_exactly_ddim_does_not(model_dirs, photo):
    """Same prompt, guidance 1, whole image as region: BELM retraces its inversion, DDIM inversion drifts."""
    rgb, _ = photo
    gen = D.make_diffusion_inversion({"model_dir": model_dirs["t2i"], "device": "cpu"})
    full = np.ones(rgb.shape[:2], bool)
    err = {}
    for sampler in ("belm", "ddim"):
        opts = {**gen.options, "steps": 4, "sampler": sampler}
        out = gen.edit(rgb, full, "a face", opts, source_prompt="a face", guidance_scale=1.0)
        err[sampler] = float((out["latents"] - out["x0"]).abs().max() / out["x0"].abs().max())
    assert err["belm"] < 1e-6, err
    assert err["ddim"] > 100 * err["belm"], err
