"""Diffusion forgeries (FORGERIES.md): Stable Diffusion inpainting and diffusion inversion, on diffusers.

Both generators load a diffusers pipeline from a LOCAL directory named in the config (``forge.sd_inpaint.model_dir``,
``forge.diffusion_inversion.model_dir``); nothing is downloaded (``HF_HUB_OFFLINE=1``, ``local_files_only=True``).
A missing directory is a :class:`~morphfuse.errors.UserError` that names the config key.

Region and prompt (both methods), drawn with the forgery's own ``rng`` (forge/common.py):
- the region is one of ``regions`` (config; default face, nose, mouth, eyes), built from the largest face's
  68-point landmarks instead of the release's face parser (no parser here; hair is therefore not offered):
  ``face`` = the landmark hull extended over the forehead (``faces.landmarks.hull_mask``), ``nose`` = hull of
  points 27-35, ``mouth`` = hull of the outer lip 48-59, ``eyes`` = the union of the two eye hulls 36-41 and
  42-47; each part hull is grown by a fraction of the inter-ocular distance (``PART_PAD``: a parser's nose or
  mouth class covers the whole organ, not only the landmark polygon);
- the prompt follows the release's wording where FORGERIES.md gives it: ``"a {sad|confident|angry|surprised|
  smiling} face"`` for face and nose; for the mouth an expression, ``"a face with a {smiling|laughing|
  frowning|pouting|wide open} mouth"``; for the eyes (not in the release, our choice) expression and colour,
  ``"a face with {closed|wide open|squinting|blue|brown|green} eyes"`` (cf. the release's "a face with
  {colour} hair"). ``prompts`` in the config block may replace any of these lists of full prompts.

SD inpainting (:class:`SDInpaintGenerator`): image and region mask are resized to the model's size (the long side
to ``size``, both sides to a multiple the UNet accepts; the mask is grown by one latent cell so the latent mask
covers the whole region), inpainted by the diffusers inpainting pipeline (``AutoPipelineForInpainting``) with a
``torch.Generator`` seeded from the forgery's ``rng`` (itself seeded from seed and image id), and resized back.
``paste_back: true`` (default): outside the region the original pixels are pasted back, so the fake equals the
real image there and the mask is exactly the region. ``paste_back: false``: the whole model output is kept and
the mask is every pixel that differs from the original (the VAE round trip and the resizing touch them all).

Diffusion inversion (:class:`DiffusionInversionGenerator`): the real image is encoded with the VAE (latent mean)
and inverted to noise over ``steps`` with the source prompt (``source_prompt``, default "" = unconditional,
guidance 1), then regenerated with the region's prompt (classifier-free guidance ``guidance_scale``) by blended
latent diffusion: after every denoising step, latents outside the region (the region mask at latent resolution,
any coverage) are replaced by the inversion trajectory's latents of that noise level (Avrahami et al.,
"Blended Latent Diffusion"). The decoded image is resized back and pasted into the original outside the region;
mask = the region. Samplers:
- ``ddim`` (default): inversion with diffusers' ``DDIMInverseScheduler`` (epsilon evaluated at the current latent
  with the next timestep, the usual approximation, so reconstruction is not exact) and regeneration with
  ``DDIMScheduler`` on the same timestep grid;
- ``belm``: O-BELM, the second-order 2-step Bidirectional Explicit Linear Multi-step sampler of Wang et al.
  (NeurIPS 2024), in the variables x̄ = x/√ᾱ, σ̄ = √(1-ᾱ)/√ᾱ with h_i = σ̄_i - σ̄_{i-1}::

      x̄_{i-1} = h_i²/h_{i+1}² · x̄_{i+1} + (1 - h_i²/h_{i+1}²) · x̄_i - h_i (h_i + h_{i+1}) / h_{i+1} · ε(x_i, t_i)

  Solving the same relation for x̄_{i+1} gives the explicit inversion step, so sampling from the pair
  (x_N, x_{N-1}) that the inversion ends with retraces the inversion exactly (up to floating-point rounding) when
  ε is the same; the pair is initialised by one DDIM inversion step x_0 → x_1. See :func:`belm_invert` and
  :func:`belm_sample` (tested for exact inversion and second order). Needs ``steps >= 2``.

Models: any diffusers Stable Diffusion 1.x/2.x pipeline (text-to-image or inpainting) for diffusion inversion, with
a 4-channel UNet or a 9-channel inpainting UNet (then the UNet is also given the region mask and the VAE latents of
the image with the region blanked, in inversion and in regeneration alike, so both use the same ε). SDXL-style
UNets (added text/time conditioning) are refused for diffusion inversion with a UserError; SD inpainting runs any
pipeline ``AutoPipelineForInpainting`` can load (SD 1.x/2.x, SDXL).

Prompt encoding: by default the pipeline's own tokenizer and text encoder. ``make_*(options, encode_prompt=f)``
takes ``f(prompt: str) -> Tensor (1, L, D)`` instead (e.g. precomputed embeddings, or a model directory without a
tokenizer); the generators then pass ``prompt_embeds`` (SD 1.x/2.x-style models).

Extra config keys (all optional): ``guidance_scale`` (7.5), ``device`` (cuda if available, else cpu), ``dtype``
(float16 on cuda, float32 on cpu), ``forehead`` (true), ``prompts``, ``source_prompt`` (""), ``size`` for
diffusion inversion (default: the UNet's sample size times the VAE's scale factor).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

from ..errors import UserError
from .common import ForgeResult, Skip, has_landmarks, largest_face

REGIONS = ("face", "nose", "mouth", "eyes")
_EXPRESSIONS = ("sad", "confident", "angry", "surprised", "smiling")
PROMPTS: dict[str, tuple[str, ...]] = {
    "face": tuple(f"a {e} face" for e in _EXPRESSIONS),
    "nose": tuple(f"a {e} face" for e in _EXPRESSIONS),
    "mouth": tuple(f"a face with a {e} mouth" for e in ("smiling", "laughing", "frowning", "pouting", "wide open")),
    "eyes": tuple(f"a face with {e} eyes" for e in ("closed", "wide open", "squinting", "blue", "brown", "green")),
}
# 0-based indices of the iBUG 68-point scheme (dlib, FAN)
PARTS: dict[str, tuple[tuple[int, ...], ...]] = {
    "nose": (tuple(range(27, 36)),),
    "mouth": (tuple(range(48, 60)),),
    "eyes": (tuple(range(36, 42)), tuple(range(42, 48))),
}
PART_PAD = {"nose": 0.12, "mouth": 0.12, "eyes": 0.15}   # growth of a part hull, fraction of the inter-ocular distance

SD_INPAINT_DEFAULTS: dict[str, Any] = {
    "model_dir": None, "steps": 30, "size": 1024, "regions": list(REGIONS), "paste_back": True,
    "guidance_scale": 7.5, "device": None, "dtype": None, "forehead": True, "prompts": None,
}
INVERSION_DEFAULTS: dict[str, Any] = {
    "model_dir": None, "steps": 30, "sampler": "ddim", "size": None, "regions": list(REGIONS),
    "guidance_scale": 7.5, "source_prompt": "", "device": None, "dtype": None, "forehead": True, "prompts": None,
}
SAMPLERS = ("ddim", "belm")

PromptEncoder = Callable[[str], Any]   # prompt -> torch.Tensor (1, L, D)


# ============================================================================================ options
def _options(options: Mapping | None, defaults: Mapping, key: str) -> dict:
    """Defaults + the config block, checked; errors name ``forge.<key>.<option>``."""
    opts = dict(defaults)
    for k, v in dict(options or {}).items():
        if v is not None or k not in defaults:   # a null in the config means "the default"
            opts[k] = v
    steps = opts["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"forge.{key}.steps must be an integer >= 1, got {steps!r}")
    size = opts.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
        raise UserError(f"forge.{key}.size must be an integer number of pixels >= 8, got {size!r}")
    regions = opts["regions"]
    if isinstance(regions, str):
        regions = [regions]
    if not regions or any(r not in REGIONS for r in regions):
        raise UserError(f"forge.{key}.regions must be a non-empty list drawn from {list(REGIONS)}, got {regions!r}"
                        " (hair needs a face parser, which is not built in)")
    opts["regions"] = list(regions)
    g = opts["guidance_scale"]
    if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
        raise UserError(f"forge.{key}.guidance_scale must be a number >= 0, got {g!r}")
    prompts = opts.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, Mapping) or any(
                k not in REGIONS or isinstance(v, str) or not v or not all(isinstance(p, str) for p in v)
                for k, v in prompts.items()):
            raise UserError(f"forge.{key}.prompts must map regions {list(REGIONS)} to non-empty lists of prompts,"
                            f" got {prompts!r}")
    if "paste_back" in opts and not isinstance(opts["paste_back"], bool):
        raise UserError(f"forge.{key}.paste_back must be true or false, got {opts['paste_back']!r}")
    if "sampler" in opts:
        if opts["sampler"] not in SAMPLERS:
            raise UserError(f"forge.{key}.sampler must be one of {list(SAMPLERS)}, got {opts['sampler']!r}")
        if opts["sampler"] == "belm" and steps < 2:
            raise UserError(f"forge.{key}.steps must be >= 2 with sampler belm (a 2-step method), got {steps}")
    return opts


def _prompt_table(opts: Mapping) -> dict[str, tuple[str, ...]]:
    table = dict(PROMPTS)
    for k, v in dict(opts.get("prompts") or {}).items():
        table[k] = tuple(v)
    return table


def choose_edit(rng: np.random.Generator, regions: Sequence[str], prompts: Mapping[str, Sequence[str]] = PROMPTS
                ) -> tuple[str, str]:
    """Draw (region, prompt) with the forgery's rng: a region from ``regions``, then one of its prompts."""
    region = str(regions[int(rng.integers(len(regions)))])
    choices = prompts[region]
    return region, str(choices[int(rng.integers(len(choices)))])


def torch_seed(rng: np.random.Generator) -> int:
    """The seed of the forgery's ``torch.Generator``, drawn from its numpy ``rng`` (seeded from seed and image id)."""
    return int(rng.integers(0, 2**63 - 1))


# ============================================================================================ regions
def _grown_hull(points: np.ndarray, radius: float) -> np.ndarray:
    """Convex hull of ``points`` grown by ``radius`` (the Minkowski sum with a 32-gon), as an int32 polygon."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if radius > 0:
        ang = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        circle = np.stack([np.cos(ang), np.sin(ang)], axis=1) * radius
        pts = (pts[:, None, :] + circle[None]).reshape(-1, 2)
    return cv2.convexHull(np.round(pts).astype(np.int32).reshape(-1, 1, 2))


def region_mask(landmarks: np.ndarray, hw: tuple[int, int], region: str, forehead: bool = True) -> np.ndarray:
    """H×W bool mask of ``region`` (face | nose | mouth | eyes) from 68-point landmarks (x, y in pixels)."""
    lm = np.asarray(landmarks, dtype=np.float64)[:68]
    if lm.shape != (68, 2):
        raise ValueError(f"region_mask needs 68-point landmarks, got shape {np.asarray(landmarks).shape}")
    h, w = int(hw[0]), int(hw[1])
    if region == "face":
        from ..faces.landmarks import hull_mask

        return np.asarray(hull_mask(lm, (h, w), forehead=forehead)) > 0
    if region not in PARTS:
        raise ValueError(f"unknown region {region!r}; expected one of {list(REGIONS)}")
    iod = float(np.linalg.norm(lm[36:42].mean(axis=0) - lm[42:48].mean(axis=0)))
    mask = np.zeros((h, w), np.uint8)
    for idx in PARTS[region]:
        cv2.fillConvexPoly(mask, _grown_hull(lm[list(idx)], PART_PAD[region] * iod), 1)
    return mask > 0


# ============================================================================================ resizing
def model_hw(h: int, w: int, size: int, multiple: int) -> tuple[int, int]:
    """Model-side (height, width): the long side ``size``, the aspect kept, both rounded to ``multiple``."""
    scale = size / max(h, w)
    return (max(multiple, int(round(h * scale / multiple)) * multiple),
            max(multiple, int(round(w * scale / multiple)) * multiple))


def _resize_rgb(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if rgb.shape[:2] == tuple(hw):
        return rgb.copy()
    return np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.Resampling.LANCZOS))


def _resize_mask(mask: np.ndarray, hw: tuple[int, int], grow: int = 0) -> np.ndarray:
    """Resize a bool mask to ``hw``, keeping every pixel touched by the region (area > 0), then grow it."""
    m = cv2.resize(mask.astype(np.float32), (hw[1], hw[0]), interpolation=cv2.INTER_AREA) > 0
    if grow > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
        m = cv2.dilate(m.astype(np.uint8), k) > 0
    return m


def _paste_back(orig: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None], generated, orig).astype(np.uint8)


# ============================================================================================ model loading
def check_model_dir(model_dir: Any, key: str) -> Path:
    """The local diffusers model directory of ``forge.<key>.model_dir``, or a UserError saying what to put there."""
    hint = (f"set forge.{key}.model_dir in the config to a LOCAL diffusers pipeline directory (the folder with "
            "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, e.g. written by "
            "pipeline.save_pretrained(DIR) or a downloaded Hugging Face snapshot); nothing is downloaded at run time")
    if model_dir in (None, ""):
        raise UserError(f"forge.{key}.model_dir is not set: {hint}")
    p = Path(str(model_dir)).expanduser()
    if not p.is_dir():
        raise UserError(f"forge.{key}.model_dir = {str(model_dir)!r} is not a directory: {hint}")
    if not (p / "model_index.json").is_file():
        raise UserError(f"forge.{key}.model_dir = {str(model_dir)!r} has no model_index.json, so it is not a "
                        f"diffusers pipeline: {hint}")
    return p


def _device_dtype(opts: Mapping):
    import torch

    device = opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    name = opts.get("dtype") or ("float16" if str(device).startswith("cuda") else "float32")
    dtype = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32}.get(str(name))
    if dtype is None:
        raise UserError(f"forge dtype must be float32, float16 or bfloat16, got {name!r}")
    return torch.device(device), dtype


def load_pipeline(model_dir: Any, key: str, inpainting: bool, device=None, dtype=None):
    """Load a diffusers pipeline from a local directory only (offline); the safety checker is not loaded.

    ``inpainting``: through ``AutoPipelineForInpainting`` (a text-to-image model dir gives its inpainting
    variant), else ``DiffusionPipeline``.
    """
    path = check_model_dir(model_dir, key)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import AutoPipelineForInpainting, DiffusionPipeline

    index = json.loads((path / "model_index.json").read_text())
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if "safety_checker" in index:   # the checker blacks out images; forgeries of consented photos need none
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cls = AutoPipelineForInpainting if inpainting else DiffusionPipeline
    try:
        pipe = cls.from_pretrained(str(path), **kwargs)
    except Exception as e:  # a broken or partial snapshot: say which directory and why, in one line
        msg = " ".join(str(e).split())[:400]
        raise UserError(f"forge.{key}.model_dir = {str(model_dir)!r}: cannot load a diffusers "
                        f"{'inpainting ' if inpainting else ''}pipeline from it ({type(e).__name__}: {msg})") from None
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _size_multiple(pipe) -> int:
    """Pixel multiple the model accepts: the VAE factor times the UNet's total downsampling."""
    vae_factor = int(getattr(pipe, "vae_scale_factor", 8))
    n_levels = len(pipe.unet.config.block_out_channels)
    return vae_factor * 2 ** (n_levels - 1)


def default_prompt_encoder(pipe, key: str) -> PromptEncoder:
    """``prompt -> (1, L, D)`` text embeddings with the pipeline's own tokenizer and text encoder."""
    if getattr(pipe, "tokenizer", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise UserError(f"forge.{key}.model_dir has no tokenizer/text_encoder: use a complete pipeline directory "
                        "(or pass encode_prompt= to the generator factory)")

    def encode(prompt: str):
        import torch

        with torch.no_grad():
            out = pipe.encode_prompt(prompt, pipe.device, 1, False)
        return out[0]

    return encode


# ============================================================================================ BELM
def _bar(alpha_bar: Sequence[float]) -> tuple[list[float], list[float]]:
    """(1/√ᾱ, σ̄ = √(1-ᾱ)/√ᾱ) per level."""
    inv_sqrt = [1.0 / math.sqrt(a) for a in alpha_bar]
    sig = [math.sqrt(1.0 - a) / math.sqrt(a) for a in alpha_bar]
    return inv_sqrt, sig


def belm_invert(x0, eps: Callable[[Any, int], Any], alpha_bar: Sequence[float]) -> list:
    """O-BELM inversion: the trajectory [x_0, x_1, ..., x_N] for noise levels ``alpha_bar`` (ᾱ_0 > ... > ᾱ_N).

    ``eps(x, i)`` is the noise prediction at level i. x_1 comes from one DDIM inversion step with ε(x_0, 0);
    then, for i = 1..N-1, the BELM relation solved for x̄_{i+1}:
    x̄_{i+1} = h_{i+1}²/h_i² x̄_{i-1} + (1 - h_{i+1}²/h_i²) x̄_i + h_{i+1}(h_i + h_{i+1})/h_i ε(x_i).
    """
    n = len(alpha_bar) - 1
    if n < 2:
        raise ValueError("BELM needs at least 2 steps")
    r, s = _bar(alpha_bar)
    traj = [x0]
    xb_prev = x0 * r[0]
    xb = xb_prev + (s[1] - s[0]) * eps(x0, 0)
    traj.append(xb / r[1])
    for i in range(1, n):
        h_i, h_n = s[i] - s[i - 1], s[i + 1] - s[i]
        e = eps(traj[i], i)
        xb_next = (h_n ** 2 / h_i ** 2) * xb_prev + (1.0 - h_n ** 2 / h_i ** 2) * xb + (h_n * (h_i + h_n) / h_i) * e
        traj.append(xb_next / r[i + 1])
        xb_prev, xb = xb, xb_next
    return traj


def belm_sample(x_n, x_n1, eps: Callable[[Any, int], Any], alpha_bar: Sequence[float],
                blend: Callable[[Any, int], Any] | None = None):
    """O-BELM sampling from the pair (x_N, x_{N-1}) down to x_0 (returned).

    x̄_{i-1} = h_i²/h_{i+1}² x̄_{i+1} + (1 - h_i²/h_{i+1}²) x̄_i - h_i(h_i + h_{i+1})/h_{i+1} ε(x_i), i = N-1..1.
    ``blend(x, i)`` (optional) maps each new x_i before it is used (blended latents).
    """
    n = len(alpha_bar) - 1
    if n < 2:
        raise ValueError("BELM needs at least 2 steps")
    r, s = _bar(alpha_bar)
    x_up, x = x_n, x_n1
    for i in range(n - 1, 0, -1):
        h_i, h_n = s[i] - s[i - 1], s[i + 1] - s[i]
        e = eps(x, i)
        xb_new = (h_i ** 2 / h_n ** 2) * (x_up * r[i + 1]) + (1.0 - h_i ** 2 / h_n ** 2) * (x * r[i]) \
            - (h_i * (h_i + h_n) / h_n) * e
        x_new = xb_new / r[i - 1]
        if blend is not None:
            x_new = blend(x_new, i - 1)
        x_up, x = x, x_new
    return x


# ============================================================================================ generators
def _face_landmarks(faces) -> tuple[np.ndarray | None, str | None]:
    if not faces:
        return None, "no face detected"
    face = largest_face(faces)
    if not has_landmarks(face):
        return None, "no 68-point landmarks for the largest face"
    return np.asarray(face.landmarks, dtype=np.float64)[:68], None


def _float01_to_uint8(img) -> np.ndarray:
    """A float image in [0, 1] (numpy H×W×3) → uint8, rounded."""
    return np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def _plan_edit(base: Mapping, call: Mapping | None, defaults: Mapping, key: str, faces, rgb: np.ndarray, rng):
    """What both diffusion generators decide before touching the model: the options (per-call ones over the
    generator's, its model_dir kept), the region and its prompt (drawn from ``rng``), the region mask and the
    torch seed (drawn next). Returns ``(opts, region, prompt, mask, seed)`` or a :class:`Skip`."""
    opts = _options({**base, **{k: v for k, v in dict(call or {}).items() if k != "model_dir"},
                     "model_dir": base.get("model_dir")}, defaults, key)
    lm, why = _face_landmarks(faces)
    if lm is None:
        return Skip(why)
    region, prompt = choose_edit(rng, opts["regions"], _prompt_table(opts))
    mask = region_mask(lm, rgb.shape[:2], region, forehead=opts["forehead"])
    if not mask.any():
        return Skip(f"{region} region is empty (landmarks outside the image)")
    return opts, region, prompt, mask, torch_seed(rng)


def _single_source_result(target, fake: np.ndarray, mask: np.ndarray, method: str, extra: dict) -> ForgeResult:
    """A forgery edited from one real image: its only source is the target."""
    return ForgeResult(fake_rgb=fake, mask=mask, source_ids=[str(target["image_id"])],
                       source_groups=[str(target["group"])], method=method, extra=extra)


class SDInpaintGenerator:
    """Generator protocol (forge/common.py) for SD inpainting of one landmark region of the largest face."""

    method = "sd_inpaint"
    needs_donors = False
    needs_landmarks = True

    def __init__(self, pipe, options: Mapping, encode_prompt: PromptEncoder | None = None):
        self.pipe = pipe
        self.options = dict(options)
        self.encode_prompt = encode_prompt
        self.multiple = _size_multiple(pipe)

    def __call__(self, target, rgb, faces, rng, options=None, donors=None) -> ForgeResult | Skip:
        import torch

        plan = _plan_edit(self.options, options, SD_INPAINT_DEFAULTS, "sd_inpaint", faces, rgb, rng)
        if isinstance(plan, Skip):
            return plan
        opts, region, prompt, mask, seed = plan
        h, w = rgb.shape[:2]
        mh, mw = model_hw(h, w, int(opts["size"]), self.multiple)
        vae_factor = int(getattr(self.pipe, "vae_scale_factor", 8))
        from PIL import Image

        img_m = Image.fromarray(_resize_rgb(rgb, (mh, mw)))
        mask_m = Image.fromarray(_resize_mask(mask, (mh, mw), grow=vae_factor).astype(np.uint8) * 255)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        kwargs: dict[str, Any] = dict(
            image=img_m,
            mask_image=mask_m,
            height=mh,
            width=mw,
            strength=1.0,
            num_inference_steps=int(opts["steps"]),
            guidance_scale=float(opts["guidance_scale"]),
            generator=gen,
            output_type="np",
        )
        if self.encode_prompt is None:
            kwargs["prompt"] = prompt
        else:
            kwargs["prompt_embeds"] = self.encode_prompt(prompt)
            if float(opts["guidance_scale"]) > 1:
                kwargs["negative_prompt_embeds"] = self.encode_prompt("")
        with torch.no_grad():
            out = self.pipe(**kwargs).images[0]
        gen_rgb = _resize_rgb(_float01_to_uint8(out), (h, w))
        if opts["paste_back"]:
            fake = _paste_back(rgb, gen_rgb, mask)
            out_mask = mask
        else:
            fake = gen_rgb
            out_mask = np.any(fake != rgb, axis=2)
            if not out_mask.any():
                return Skip("the inpainted image equals the original")
        extra = {"region": region, "prompt": prompt, "torch_seed": seed, "model_hw": (mh, mw),
                 "steps": int(opts["steps"]), "paste_back": bool(opts["paste_back"])}
        return _single_source_result(target, fake, out_mask, self.method, extra)


class DiffusionInversionGenerator:
    """Generator protocol for diffusion inversion (DDIM or O-BELM) + blended-latent regeneration of one region."""

    method = "diffusion_inversion"
    needs_donors = False
    needs_landmarks = True

    def __init__(self, pipe, options: Mapping, encode_prompt: PromptEncoder | None = None):
        unet = pipe.unet
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise UserError(
                f"forge.diffusion_inversion.model_dir = {options.get('model_dir')!r} is an SDXL-style model "
                f"(UNet addition_embed_type={unet.config.addition_embed_type!r}), which diffusion inversion "
                "does not support: use a Stable Diffusion 1.x/2.x pipeline directory"
            )
        if unet.config.in_channels not in (4, 9) and unet.config.in_channels != pipe.vae.config.latent_channels:
            raise UserError(f"forge.diffusion_inversion.model_dir: UNet with {unet.config.in_channels} input channels "
                            "is neither a text-to-image nor an inpainting Stable Diffusion UNet")
        self.pipe = pipe
        self.options = dict(options)
        self.encode_prompt = encode_prompt or default_prompt_encoder(pipe, "diffusion_inversion")
        self.multiple = _size_multiple(pipe)
        self.vae_factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.inpaint_unet = unet.config.in_channels == pipe.vae.config.latent_channels * 2 + 1
        self._embeds: dict[str, Any] = {}

    # ------------------------------------------------------------------ pieces
    def _embed(self, prompt: str):
        if prompt not in self._embeds:
            self._embeds[prompt] = self.encode_prompt(prompt).to(self.pipe.device, self.pipe.unet.dtype)
        return self._embeds[prompt]

    def _encode(self, x):
        """VAE latents (distribution mean, scaled) of a (1, 3, H, W) image in [-1, 1]."""
        vae = self.pipe.vae
        return vae.encode(x.to(self.pipe.device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor

    def _decode(self, latents) -> np.ndarray:
        vae = self.pipe.vae
        img = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        img = (img.float().clamp(-1, 1) + 1) / 2
        return _float01_to_uint8(img[0].permute(1, 2, 0).cpu().numpy())

    def _make_eps(self, alphas_cumprod, cond_extra):
        """ε(x, t, emb, uncond, g) with classifier-free guidance, converted to an epsilon prediction."""
        import torch

        unet = self.pipe.unet
        ptype = self.pipe.scheduler.config.get("prediction_type", "epsilon")

        def eps(x, t, emb, uncond=None, g: float = 1.0):
            t = int(t)
            cfg = uncond is not None and g != 1.0
            inp = torch.cat([x, x]) if cfg else x
            hs = torch.cat([uncond, emb]) if cfg else emb
            if cond_extra is not None:
                inp = torch.cat([inp, cond_extra.to(inp.dtype).expand(inp.shape[0], -1, -1, -1)], dim=1)
            out = unet(inp.to(unet.dtype), t, encoder_hidden_states=hs).sample.to(x.dtype)
            if cfg:
                out_u, out_c = out.chunk(2)
                out = out_u + g * (out_c - out_u)
            if ptype == "epsilon":
                return out
            a = float(alphas_cumprod[t])
            if ptype == "v_prediction":
                return math.sqrt(a) * out + math.sqrt(1 - a) * x
            if ptype == "sample":
                return (x - math.sqrt(a) * out) / math.sqrt(1 - a)
            raise UserError(f"forge.diffusion_inversion: unsupported scheduler prediction_type {ptype!r}")

        return eps

    def _schedulers(self, steps: int):
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        cfg = dict(self.pipe.scheduler.config)
        spacing = cfg.get("timestep_spacing", "leading")
        over = dict(timestep_spacing=spacing if spacing in ("leading", "trailing") else "leading",
                    prediction_type="epsilon", clip_sample=False)
        def build(cls):   # only the keys the class takes (a PNDM or Euler config has others)
            import inspect

            keys = set(inspect.signature(cls.__init__).parameters)
            return cls.from_config({k: v for k, v in cfg.items() if k in keys}, **over)

        fwd, inv = build(DDIMScheduler), build(DDIMInverseScheduler)
        fwd.set_timesteps(steps)
        inv.set_timesteps(steps)
        if sorted(int(t) for t in fwd.timesteps) != [int(t) for t in inv.timesteps]:
            raise RuntimeError("DDIM and inverse DDIM timestep grids differ")
        return fwd, inv

    # ------------------------------------------------------------------ edit
    def edit(self, rgb_m: np.ndarray, mask_m: np.ndarray, prompt: str, opts: Mapping,
             source_prompt: str | None = None, guidance_scale: float | None = None) -> dict:
        """Invert ``rgb_m`` (model size), regenerate with ``prompt`` inside ``mask_m`` (latent-blended).

        Returns ``{"image": uint8 at model size, "latents": final latents, "x0": the image's latents}``.
        """
        import torch
        import torch.nn.functional as F

        steps = int(opts["steps"])
        g = float(opts["guidance_scale"] if guidance_scale is None else guidance_scale)
        src = self._embed(opts["source_prompt"] if source_prompt is None else source_prompt)
        tgt, unc = self._embed(prompt), self._embed("")
        device = self.pipe.device
        with torch.no_grad():
            img = (
                torch.from_numpy(np.array(rgb_m, dtype=np.float32))
                .permute(2, 0, 1)[None]
                .div(127.5)
                .sub(1.0)
                .to(device)
            )
            x0 = self._encode(img)
            lh, lw = x0.shape[-2:]
            m = torch.from_numpy(mask_m.astype(np.float32))[None, None].to(device)
            m_lat = (F.adaptive_max_pool2d(m, (lh, lw)) > 0).float()   # latent cells touched by the region
            cond_extra = None
            if self.inpaint_unet:   # as the inpainting pipeline: the mask and the image with the region at 0 (grey)
                m_pix = F.interpolate(m_lat, size=img.shape[-2:], mode="nearest")
                cond_extra = torch.cat([m_lat, self._encode(img * (m_pix < 0.5))], dim=1)
            fwd, inv = self._schedulers(steps)
            ac = fwd.alphas_cumprod
            eps = self._make_eps(ac, cond_extra)
            ts = [int(t) for t in inv.timesteps]          # ascending: the noise level reached after each step

            def blend(x, level_latent):
                return m_lat * x + (1 - m_lat) * level_latent

            if opts["sampler"] == "ddim":
                traj, x = [x0], x0
                for t in ts:
                    x = inv.step(eps(x, t, src), t, x).prev_sample
                    traj.append(x)
                x = traj[-1]
                for k, t in enumerate(int(t) for t in fwd.timesteps):
                    x = fwd.step(eps(x, t, tgt, unc, g), t, x).prev_sample
                    x = blend(x, traj[steps - 1 - k])
            else:   # belm
                a0 = float(inv.initial_alpha_cumprod)
                alpha_bar = [a0] + [float(ac[t]) for t in ts]
                level_t = [ts[0]] + ts          # level 0 is evaluated (first DDIM step) with the first timestep
                # the linear combinations in float64 (where the device has it), so that rounding stays far
                # below the model's own precision and the inversion is exact in practice
                x0d = x0.double() if device.type != "mps" else x0
                traj = belm_invert(x0d, lambda x, i: eps(x, level_t[i], src), alpha_bar)
                x = belm_sample(traj[-1], traj[-2],
                                lambda x, i: eps(x, level_t[i], tgt, unc, g), alpha_bar,
                                blend=lambda x, i: blend(x, traj[i]))
            x = x.float()
            image = self._decode(x)
        return {"image": image, "latents": x, "x0": x0}

    def __call__(self, target, rgb, faces, rng, options=None, donors=None) -> ForgeResult | Skip:
        # the torch seed is drawn for a stable rng stream; inversion + DDIM/BELM sampling are deterministic
        plan = _plan_edit(self.options, options, INVERSION_DEFAULTS, "diffusion_inversion", faces, rgb, rng)
        if isinstance(plan, Skip):
            return plan
        opts, region, prompt, mask, seed = plan
        h, w = rgb.shape[:2]
        size = opts["size"] or int(self.pipe.unet.config.sample_size) * self.vae_factor
        mh, mw = model_hw(h, w, int(size), self.multiple)
        res = self.edit(_resize_rgb(rgb, (mh, mw)), _resize_mask(mask, (mh, mw)), prompt, opts)
        fake = _paste_back(rgb, _resize_rgb(res["image"], (h, w)), mask)
        extra = {"region": region, "prompt": prompt, "torch_seed": seed, "model_hw": (mh, mw),
                 "steps": int(opts["steps"]), "sampler": opts["sampler"]}
        return _single_source_result(target, fake, mask, self.method, extra)


# ============================================================================================ factories
def make_sd_inpaint(options: Mapping | None = None, *, pipeline=None,
                    encode_prompt: PromptEncoder | None = None) -> SDInpaintGenerator:
    """SD inpainting generator; loads the pipeline from ``options["model_dir"]`` (local only) unless given one."""
    opts = _options(options, SD_INPAINT_DEFAULTS, "sd_inpaint")
    if pipeline is None:
        device, dtype = _device_dtype(opts)
        pipeline = load_pipeline(opts["model_dir"], "sd_inpaint", inpainting=True, device=device, dtype=dtype)
    return SDInpaintGenerator(pipeline, opts, encode_prompt=encode_prompt)


def make_diffusion_inversion(options: Mapping | None = None, *, pipeline=None,
                             encode_prompt: PromptEncoder | None = None) -> DiffusionInversionGenerator:
    """Diffusion-inversion generator (sampler ddim | belm); loads the pipeline from ``options["model_dir"]``."""
    opts = _options(options, INVERSION_DEFAULTS, "diffusion_inversion")
    if pipeline is None:
        device, dtype = _device_dtype(opts)
        pipeline = load_pipeline(opts["model_dir"], "diffusion_inversion", inpainting=False, device=device, dtype=dtype)
    return DiffusionInversionGenerator(pipeline, opts, encode_prompt=encode_prompt)
