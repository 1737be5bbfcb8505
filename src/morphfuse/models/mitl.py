"""MITL: Mesoscopic Image Tampering Localization (Mesorch), as specified in ``shared/spec/MITL.md``.

Reads top-down like the paper's figure::

    rgb in [0, 1] ── ImageNet normalisation ──> x
    x ── FEIR (full-image DCT, morphfuse.dct) ──> high, low          (or precomputed ``dct_high``/``dct_low``)
    I_h = [x, high] ── ConvNeXt-Tiny (timm, 6 ch) ──> c1..c4 at H/4 .. H/32
    I_l = [x, low]  ── MiT-B3 (transformers SegformerModel, 6 ch, SDPA) ──> s1..s4 at H/4 .. H/32
    DFGMG decoders: ConvTranspose2d(k4, s2, p1) chains halving the channels bring c2..c4, s2..s4 to H/4;
                    one 1x1 conv per feature ──> 8 single-channel logit maps M_j at H/4
    AMW: [x, high, low] (9 ch) ──> softmax weights W_j at H/4
    logits = sum_j W_j M_j at H/4 ── bilinear ──> input size;  loss = BCE with logits vs the mask

Input sides must be multiples of 32 (non-square is fine): ConvNeXt floors and MiT pads its strided convolutions,
so only then do the two pyramids and the decoders' exact doublings meet at the same H/4 grid.

Decisions where the spec leaves room (each differs from the release only as said):
- AMW residual block as released: LayerNorm2d -> Conv3x3 -> Conv1x1 (192->768) -> Conv1x1 (768->192) -> GELU, then
  added to its input. GELU comes last, so the three convolutions compose to one linear map (no non-linearity
  between the two 1x1 convolutions, unlike a ConvNeXt block). ``MITL.fuse_for_inference()`` uses that at
  inference: one 3x3 convolution 192->192 instead of the three (244.6 -> 206.0 GFLOPs at 512), same outputs up
  to float rounding; training always runs the three.
- The stems keep their bias (timm/transformers default; pretrained RGB bias kept). The release rebuilt both stems
  with ``bias=False``, dropping the pretrained bias: 96 + 64 parameters fewer than ours.
- The final upsampling uses ``align_corners=False`` (pixel-centre aligned with the stride-4 grid); the release
  used ``align_corners=True``.
- MiT-B3 is transformers' SegformerModel, whose LayerNorms use eps 1e-5 (the release's blocks: 1e-6).
- On-the-fly DCT bands are computed in float32 outside autocast (dct.py), so they match the stored bands under
  bf16 too; stored float16 bands are read as float32.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models import FeatureListNet
from timm.models.convnext import checkpoint_filter_fn as convnext_filter_fn
from torch import Tensor
from transformers import SegformerConfig, SegformerModel

from morphfuse.dct import LOW_BANDS, dct_bands
from morphfuse.errors import UserError
from morphfuse.models.recipes import WORKFLOW_KEYS
from morphfuse.normalize import mitl_input

SIZE_MULTIPLE = 32
SCORE_RULES = ("max", "top_percent")

# MiT-B3 (MITL.md): embed dims, heads, depths, spatial-reduction ratios, MLP ratio 4, overlapping patch embeddings.
MIT_B3 = dict(
    hidden_sizes=[64, 128, 320, 512],
    num_attention_heads=[1, 2, 5, 8],
    depths=[3, 4, 18, 3],
    sr_ratios=[8, 4, 2, 1],
    mlp_ratios=[4, 4, 4, 4],
    patch_sizes=[7, 3, 3, 3],
    strides=[4, 2, 2, 2],
)
IN_CHANS = 6  # [x, band]


# ------------------------------------------------------------------------------------------ building blocks
def upsampling_decoder(dims: Sequence[int], level: int) -> nn.Sequential:
    """Bring the feature of pyramid ``level`` (channels ``dims[level]``) to level 0 (H/4, ``dims[0]`` channels).

    A chain of ConvTranspose2d(k4, s2, p1), each doubling the side and stepping down one level's channels
    (768->384->192->96 for ConvNeXt level 3). Level 0 gives an empty Sequential: the H/4 feature as is.
    """
    return nn.Sequential(*[nn.ConvTranspose2d(dims[j], dims[j - 1], kernel_size=4, stride=2, padding=1)
                           for j in range(level, 0, -1)])


def compose_convs(conv3: nn.Conv2d, conv1a: nn.Conv2d, conv1b: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of the one convolution equal to ``conv1b(conv1a(conv3(x)))`` (two 1x1 after a kxk, nothing
    in between): W = B·A·W3 per tap, b = B·(A·b3 + a) + b_B. Exact up to rounding, borders included (the 1x1
    convolutions act per pixel, so the kxk's zero padding and bias carry over unchanged). Computed in float64
    (float32 on devices other than CPU, CUDA and meta), returned in the weights' dtype, without autograd."""
    for c in (conv1a, conv1b):
        if c.kernel_size != (1, 1) or c.stride != (1, 1) or c.padding != (0, 0) or c.groups != 1:
            raise ValueError("compose_convs: the second and third convolutions must be plain 1x1 convolutions")
    w3 = conv3.weight
    dtype = w3.dtype
    wide = torch.float64 if w3.device.type in ("cpu", "cuda", "meta") else torch.float32
    with torch.no_grad():
        a = conv1a.weight.to(wide)[:, :, 0, 0]                           # (E, C)
        b = conv1b.weight.to(wide)[:, :, 0, 0]                           # (C', E)
        ba = b @ a                                                       # (C', C)
        weight = torch.einsum("oc,cikl->oikl", ba, w3.to(wide))
        bias = torch.zeros(ba.shape[0], dtype=wide, device=w3.device)
        if conv3.bias is not None:
            bias = bias + ba @ conv3.bias.to(wide)
        if conv1a.bias is not None:
            bias = bias + b @ conv1a.bias.to(wide)
        if conv1b.bias is not None:
            bias = bias + conv1b.bias.to(wide)
    return weight.to(dtype).contiguous(), bias.to(dtype)


class WeightingNet(nn.Module):
    """AMW (eq. 16-18): per-pixel softmax weights over the 8 logit maps, at H/4, from [x, high, low].

    :meth:`fuse` (inference only) makes the residual block's three convolutions run as the one 3x3 convolution
    they compose to (:func:`compose_convs`; 82.1 -> 43.5 GFLOPs at 512). The original convolutions stay the
    parameters (state dict, training, checkpoints unchanged); the fused weights are a cache, not a buffer, rebuilt
    when the parameters' device, dtype or values (in-place updates, ``load_state_dict``) change. ``train()``
    unfuses; the fused path is used only in eval mode and when no gradient to these weights is asked for.
    """

    def __init__(self, in_chans: int = 9, n_maps: int = 8, dim: int = 192, expansion: int = 4):
        super().__init__()
        self.conv_in = nn.Conv2d(in_chans, dim, kernel_size=7, stride=2, padding=3)        # H/2
        self.block = nn.Sequential(                                                       # residual, as released
            LayerNorm2d(dim),
            nn.Conv2d(dim, dim, kernel_size=3, padding=1),
            nn.Conv2d(dim, expansion * dim, kernel_size=1),
            nn.Conv2d(expansion * dim, dim, kernel_size=1),
            nn.GELU(),
        )
        self.conv_out = nn.Conv2d(dim, n_maps, kernel_size=7, stride=2, padding=3)       # H/4
        self.fused = False
        self._fused_cache: tuple | None = None  # (key, weight, bias); a plain attribute: not in the state dict

    # ---------------------------------------------------------------------------------------------- fusing
    def _convs(self) -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]:
        return self.block[1], self.block[2], self.block[3]

    def _cache_key(self) -> tuple:
        params = [t for c in self._convs() for t in (c.weight, c.bias) if t is not None]
        return tuple((t.device, t.dtype, t.data_ptr() if t.device.type != "meta" else id(t), t._version)
                     for t in params)

    def _fused_weights(self) -> tuple[Tensor, Tensor]:
        key = self._cache_key()
        if self._fused_cache is None or self._fused_cache[0] != key:
            self._fused_cache = (key, *compose_convs(*self._convs()))
        return self._fused_cache[1], self._fused_cache[2]

    def fuse(self) -> WeightingNet:
        """Use the composed 3x3 convolution from now on (eval mode only; idempotent; ``train()`` undoes it)."""
        if self.training:
            raise RuntimeError("WeightingNet.fuse / MITL.fuse_for_inference is for inference: call .eval() first "
                               "(training needs the three separate convolutions)")
        self.fused = True
        self._fused_weights()  # built now, outside any FLOP counter or timed region
        return self

    def unfuse(self) -> WeightingNet:
        self.fused = False
        self._fused_cache = None
        return self

    def train(self, mode: bool = True) -> WeightingNet:
        if mode:
            self.unfuse()
        return super().train(mode)

    def _use_fused(self) -> bool:
        if not self.fused or self.training:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for c in self._convs() for p in c.parameters()))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        if self._use_fused():
            weight, bias = self._fused_weights()
            conv3 = self.block[1]
            y = F.conv2d(self.block[0](x), weight, bias, stride=conv3.stride, padding=conv3.padding,
                         dilation=conv3.dilation, groups=conv3.groups)
            x = x + self.block[4](y)
        else:
            x = x + self.block(x)
        return self.conv_out(x).float().softmax(dim=1)


# ------------------------------------------------------------------------------------ encoders + checkpoints
def six_channel_stem(rgb_weight: Tensor) -> Tensor:
    """An RGB stem weight (O, 3, k, k) -> (O, 6, k, k): RGB copied into channels 0-2, Kaiming normal in 3-5."""
    extra = nn.init.kaiming_normal_(torch.empty(rgb_weight.shape, dtype=torch.float32))
    return torch.cat([rgb_weight.float(), extra], dim=1)


def _load_exactly(module: nn.Module, state: dict[str, Tensor], option: str, path: str) -> None:
    """Load ``state`` into ``module``: every key present and shaped right, else a UserError listing the keys."""
    from .pretrained import strict_report

    own = module.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise UserError(f"mitl.pretrained.{option} = {path}: does not fit the network: shapes differ "
                        f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")
    strict_report(f"mitl.pretrained.{option}", path, "the network", set(own) - set(state), set(state) - set(own))
    module.load_state_dict(state, strict=True)


def load_convnext_checkpoint(net: nn.Module, spec: str | Path) -> None:
    """Load RGB ConvNeXt weights (timm or Facebook layout; a .pth / .safetensors file, a save_pretrained folder or
    a hub id in the local cache: models/pretrained.py) into a 6-channel timm ConvNeXt, strictly: the classifier
    head is skipped, the stem widened by :func:`six_channel_stem`."""
    from .pretrained import read_state_dict, resolve

    path = resolve(spec, "mitl.pretrained.convnext")
    if path is None:
        return
    state = convnext_filter_fn(read_state_dict(path, "mitl.pretrained.convnext"), net)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "stem.0.weight" not in state:
        raise UserError(f"mitl.pretrained.convnext = {path}: has no 'stem.0.weight'; expected a ConvNeXt checkpoint")
    state["stem.0.weight"] = six_channel_stem(state["stem.0.weight"])
    head = {k: v for k, v in net.state_dict().items() if k.startswith("head.")}
    _load_exactly(net, {**state, **head}, "convnext", str(path))


_NVLABS_MIT = [  # NVlabs/SegFormer (mit_b3.pth, as the release loads) -> transformers SegformerModel
    (r"^patch_embed(\d)\.proj\.", "stages.{s}.patch_embeddings.proj."),
    (r"^patch_embed(\d)\.norm\.", "stages.{s}.patch_embeddings.layer_norm."),
    (r"^block(\d)\.(\d+)\.norm1\.", "stages.{s}.blocks.{b}.layernorm_before."),
    (r"^block(\d)\.(\d+)\.norm2\.", "stages.{s}.blocks.{b}.layernorm_after."),
    (r"^block(\d)\.(\d+)\.attn\.q\.", "stages.{s}.blocks.{b}.attention.q_proj."),
    (r"^block(\d)\.(\d+)\.attn\.proj\.", "stages.{s}.blocks.{b}.attention.o_proj."),
    (r"^block(\d)\.(\d+)\.attn\.sr\.", "stages.{s}.blocks.{b}.attention.sequence_reduction.sequence_reduction."),
    (r"^block(\d)\.(\d+)\.attn\.norm\.", "stages.{s}.blocks.{b}.attention.sequence_reduction.layer_norm."),
    (r"^block(\d)\.(\d+)\.mlp\.", "stages.{s}.blocks.{b}.mlp."),
    (r"^norm(\d)\.", "stages.{s}.layer_norm."),
]


def convert_nvlabs_mit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """NVlabs MiT key layout -> SegformerModel's; ``attn.kv`` is split into k (first half) and v; ``head.*``
    (ImageNet classifier) is dropped."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^block(\d)\.(\d+)\.attn\.kv\.(weight|bias)$", key)
        if m:
            prefix = f"stages.{int(m[1]) - 1}.blocks.{m[2]}.attention"
            k, v = value.chunk(2, dim=0)
            out[f"{prefix}.k_proj.{m[3]}"], out[f"{prefix}.v_proj.{m[3]}"] = k, v
            continue
        for pattern, template in _NVLABS_MIT:
            m = re.match(pattern, key)
            if m:
                new = template.format(s=int(m[1]) - 1, b=m[2] if m.lastindex > 1 else "")
                out[new + key[m.end():]] = value
                break
        else:
            if not key.startswith("head."):
                out[key] = value  # left for _load_exactly to report
    return out


def _segformer_state_from_folder(folder: Path, path: Path) -> dict[str, Tensor]:
    """State dict of a transformers SegFormer / MiT folder, via ``from_pretrained`` (which converts older
    transformers key names); tensors the folder's weights lack are an error, not a random initialisation."""
    from .pretrained import strict_report

    try:
        model, info = SegformerModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise UserError(f"mitl.pretrained.segformer = {path}: not a loadable SegFormer / MiT folder "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    heads = ("classifier.", "decode_head.", "segformer.decode_head.")
    strict_report("mitl.pretrained.segformer", path, "a MiT encoder (SegformerModel)",
                  list(info.get("missing_keys", [])) + [str(m) for m in info.get("mismatched_keys", [])],
                  [k for k in info.get("unexpected_keys", []) if not k.startswith(heads)])
    return model.state_dict()


def load_segformer_checkpoint(mit: SegformerModel, spec: str | Path) -> None:
    """Load RGB MiT weights into a 6-channel SegformerModel, strictly, the stem widened by :func:`six_channel_stem`.

    ``spec`` (models/pretrained.py) resolves to a transformers folder (``save_pretrained``, e.g. the snapshot of
    ``nvidia/mit-b3``) or a state-dict file (.pth / .safetensors) in NVlabs' original MiT layout (``mit_b3.pth``,
    as the release loads: converted by :func:`convert_nvlabs_mit`), in transformers' older layout
    (``encoder.block...``, ``segformer.`` prefix allowed: converted by transformers' own loader) or in
    SegformerModel's layout."""
    import tempfile

    from .pretrained import read_state_dict, resolve, weights_file

    path = resolve(spec, "mitl.pretrained.segformer")
    if path is None:
        return
    if path.is_dir() and (path / "config.json").is_file():
        state = _segformer_state_from_folder(path, path)
    else:
        state = read_state_dict(path, "mitl.pretrained.segformer")
        state = {k.removeprefix("segformer."): v for k, v in state.items()}
        if "patch_embed1.proj.weight" in state:
            state = convert_nvlabs_mit(state)
        elif any(k.startswith("encoder.") for k in state):  # transformers' older names: let transformers convert
            file = weights_file(path, "mitl.pretrained.segformer")
            with tempfile.TemporaryDirectory() as tmp:
                config = SegformerConfig(**{**mit.config.to_dict(), "num_channels": 3})
                config.save_pretrained(tmp)
                name = "model.safetensors" if file.suffix == ".safetensors" else "pytorch_model.bin"
                os.symlink(file.resolve(), os.path.join(tmp, name))
                state = _segformer_state_from_folder(Path(tmp), path)
    stem = "stages.0.patch_embeddings.proj.weight"
    if stem not in state:
        raise UserError(f"mitl.pretrained.segformer = {path}: has no MiT stem weight; expected a MiT/SegFormer "
                        "encoder checkpoint (transformers folder, NVlabs mit_b3.pth or SegformerModel state dict)")
    state[stem] = six_channel_stem(state[stem])
    _load_exactly(mit, state, "segformer", str(path))


def convnext_tiny_features(checkpoint: str | Path | None = None) -> FeatureListNet:
    """ConvNeXt-Tiny on 6 channels, stage outputs at H/4..H/32, no classifier: the very module
    ``timm.create_model('convnext_tiny', features_only=True, in_chans=6)`` builds, with an optional local RGB
    checkpoint loaded into the full network first (as timm itself does for pretrained weights)."""
    net = timm.create_model("convnext_tiny", pretrained=False, in_chans=IN_CHANS)
    if checkpoint is not None:
        load_convnext_checkpoint(net, checkpoint)
    return FeatureListNet(net, out_indices=(0, 1, 2, 3), flatten_sequential=True)


def mit_b3(checkpoint: str | Path | None = None, drop_path: float = 0.1) -> SegformerModel:
    """MiT-B3 on 6 channels (transformers SegformerModel: no decode head), PyTorch SDPA attention."""
    config = SegformerConfig(num_channels=IN_CHANS, drop_path_rate=drop_path, **MIT_B3,
                             attn_implementation="sdpa")
    mit = SegformerModel(config)
    if checkpoint is not None:
        load_segformer_checkpoint(mit, checkpoint)
    return mit


# --------------------------------------------------------------------------------------------------- model
class MITL(nn.Module):
    """Whole-image tampering localisation; ``forward``/``loss``/``predict_proba`` follow docs/CONTRACTS.md.

    Options (the config's ``mitl:`` block): ``low_band`` ('l_shape' | 'square'), ``pretrained`` ({convnext,
    segformer}: each scratch / null, a local file or folder, or a hub id in the local cache; models/pretrained.py),
    ``score`` ({rule: 'max' | 'top_percent', percent}),
    ``drop_path`` (MiT stochastic depth, 0.1). ``gpus``, ``paper`` and ``train`` are accepted and ignored.
    """

    name = "mitl"

    def __init__(self, size: int = 512, low_band: str = "l_shape", pretrained: dict | None = None,
                 score: dict | None = None, drop_path: float = 0.1, **options: Any):
        super().__init__()
        unknown = sorted(set(options) - (WORKFLOW_KEYS - {"size"}))
        if unknown:
            raise UserError(f"mitl: unknown option(s) {unknown}; expected size, low_band, pretrained, score, "
                            f"drop_path (or {', '.join(sorted(WORKFLOW_KEYS - {'size'}))}, which the model ignores)")
        if size % SIZE_MULTIPLE or size <= 0:
            raise UserError(f"mitl.size must be a positive multiple of {SIZE_MULTIPLE}, got {size}")
        if low_band not in LOW_BANDS:
            raise UserError(f"mitl.low_band must be one of {LOW_BANDS}, got {low_band!r}")
        if pretrained is None or pretrained == "scratch":
            pretrained = {}
        if not isinstance(pretrained, dict):
            raise UserError(f"mitl.pretrained = {pretrained!r}: must be scratch or a mapping with keys convnext and "
                            "segformer (each scratch, a local file or folder, or a hub id in the local cache)")
        pretrained = dict(pretrained)
        if set(pretrained) - {"convnext", "segformer"}:
            raise UserError(f"mitl.pretrained takes keys convnext and segformer, got {sorted(pretrained)}")
        score = {"rule": "top_percent", "percent": 1.0, **(score or {})}
        if score["rule"] not in SCORE_RULES:
            raise UserError(f"mitl.score.rule must be one of {SCORE_RULES}, got {score['rule']!r}")
        if not 0 < float(score["percent"]) <= 100:
            raise UserError(f"mitl.score.percent must be in (0, 100], got {score['percent']}")
        self.size, self.low_band = size, low_band
        self.score_rule, self.score_percent = score["rule"], float(score["percent"])

        # DFGMG: two encoders, their decoders to H/4, one 1x1 logit conv per map.
        self.convnext = convnext_tiny_features(pretrained.get("convnext"))
        self.mit = mit_b3(pretrained.get("segformer"), drop_path=drop_path)
        local_dims = self.convnext.feature_info.channels()           # 96, 192, 384, 768
        global_dims = list(self.mit.config.hidden_sizes)              # 64, 128, 320, 512
        self.decoders = nn.ModuleList([upsampling_decoder(local_dims, i) for i in range(4)]
                                      + [upsampling_decoder(global_dims, i) for i in range(4)])
        self.heads = nn.ModuleList([nn.Conv2d(local_dims[0], 1, 1) for _ in range(4)]
                                   + [nn.Conv2d(global_dims[0], 1, 1) for _ in range(4)])
        # AMW on [x, high, low].
        self.weighting = WeightingNet(in_chans=3 * 3, n_maps=len(self.heads))

    # ---------------------------------------------------------------------------------------------- parts
    def _bands(self, batch: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """FEIR bands: the batch's precomputed ``dct_high``/``dct_low`` if given, else ``dct_bands`` of x."""
        given = [k for k in ("dct_high", "dct_low") if k in batch]
        if len(given) == 1:
            raise ValueError(f"batch has {given[0]} but not the other DCT band; give both or neither")
        if given:
            high, low = batch["dct_high"], batch["dct_low"]
            if high.shape != x.shape or low.shape != x.shape:
                raise ValueError(f"dct_high {tuple(high.shape)} / dct_low {tuple(low.shape)} must match the image "
                                 f"{tuple(x.shape)}")
            return high.to(x.device, torch.float32), low.to(x.device, torch.float32)
        return dct_bands(x, self.low_band)  # float32, outside autocast (dct.py)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``rgb`` (B,3,H,W) in [0,1], H and W multiples of 32 -> ``logits`` (B,1,H,W), ``maps`` and
        ``weights`` (B,8,H/4,W/4)."""
        rgb = batch["rgb"]
        if rgb.ndim != 4 or rgb.shape[1] != 3 or rgb.shape[-2] % SIZE_MULTIPLE or rgb.shape[-1] % SIZE_MULTIPLE:
            raise ValueError(f"MITL takes rgb of shape (B, 3, H, W) with H and W multiples of {SIZE_MULTIPLE}, "
                             f"got {tuple(rgb.shape)}")
        x = mitl_input(rgb.float())
        high, low = self._bands(batch, x)

        local = self.convnext(torch.cat([x, high], dim=1))
        glob = self.mit(torch.cat([x, low], dim=1), output_hidden_states=True).hidden_states
        maps = torch.cat([head(decoder(f)) for head, decoder, f in zip(self.heads, self.decoders, [*local, *glob])],
                         dim=1)
        weights = self.weighting(torch.cat([x, high, low], dim=1))
        logits = (weights * maps.float()).sum(dim=1, keepdim=True)
        logits = F.interpolate(logits, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return {"logits": logits, "maps": maps, "weights": weights}

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """BCE with logits of the mask (weight 1), the only loss."""
        bce = F.binary_cross_entropy_with_logits(out["logits"].float(), batch["mask"].to(torch.float32))
        return bce, {"bce": bce.item()}

    def score_from_mask(self, prob: Tensor) -> Tensor:
        """Image score (B,) from the mask probabilities (B,1,H,W): their max, or the mean of the top k %."""
        flat = prob.flatten(1)
        if self.score_rule == "max":
            return flat.amax(dim=1)
        k = max(1, math.ceil(flat.shape[1] * self.score_percent / 100))
        return flat.topk(k, dim=1).values.mean(dim=1)

    def fuse_for_inference(self) -> MITL:
        """Inference speed-up, same outputs up to float rounding: the AMW residual block's three convolutions
        (3x3, 1x1 192->768, 1x1 768->192; nothing non-linear between them) run as the one 3x3 convolution they
        compose to, 38.6 of the 244.6 GFLOPs at 512 saved. Call after ``eval()`` (RuntimeError otherwise);
        idempotent; ``train()`` undoes it. Weights, state dict and checkpoints are unchanged. Returns self."""
        if self.training:
            raise RuntimeError("MITL.fuse_for_inference: call .eval() first (fusing is for inference only)")
        self.weighting.fuse()
        return self

    @torch.no_grad()
    def predict_proba(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Score (B,) and mask probability (B,1,H,W), both in [0, 1], at the input size (call ``eval()`` first)."""
        prob = torch.sigmoid(self.forward(batch)["logits"].float())
        return self.score_from_mask(prob), prob
