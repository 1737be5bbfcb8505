"""LFDL: the two-stream Xception network for face-crop forgery detection and patch localization (LFDL.md).

Reads top-down like the paper's figure::

    rgb ∈ [0,1] ──normalise──► x ──────────────► RGB Xception (timm legacy_xception, exit flow deleted)
                               └─ SRM residuals ► SRM Xception (timm legacy_xception, fc deleted)
    stem, block1, block2 : CMCE couples the two streams (no learned weights)
    block3               : both streams take rgb2 + srm2
    block3, 4–7, 8–11    : LFGA, RGB-guided attention that changes the SRM stream only
    localization head    : MPFF over the RGB features x0..x5 → 2 logits per patch on the G×G grid of x5
    pixel head           : the IJCAI release's seg_header2 on x5 (3×3 728→256, 3×3 256→64, 1×1 64→2), its logits
                           upsampled (bilinear) to S×S; the masks come from it by default (``mask_head: pixel``)
    classification head  : SRM features y0,y1,y2,y3,y5 max-pooled to P×P, bilinear fusion with the exit flow y6
    loss                 : L_cls + L_loc (patch, 1:1) + L_pix (pixel; the IJCAI release's cls + seg1 + seg2);
                           patch targets from the mask or from SSPSL pseudo labels, pixel targets from the mask

Every grid is derived from the input side S: G (patch grid) is the side of x5, P that of the exit-flow output.
At S = 299 with the IJCAI release's (and timm's) stem padding 0 the feature sides are 147, 74, 37, 19, 10 (G = 19,
P = 10); with Locate-and-Verify's padding 1 they are 150, 75, 38, 19, 10 (same G and P, same head widths).

Choices where the paper, the release and our rules differ (each is an option or stated here):
- ``stem_padding`` 0 (default: the IJCAI release and timm) or 1 (Locate-and-Verify): set as the ``padding``
  attribute of the two stem convolutions at construction (configuration of timm's modules; nothing else inside
  timm is touched).
- CMCE ``cmce_use_updated_rgb`` (release: true): srm' = ReLU(srm + c·rgb_u) with rgb_u = rgb + c·srm, the
  updated RGB feature before its ReLU, exactly as released; false gives the paper's srm + c·rgb.
- LFGA: energies are q·k without the 1/√d factor as released (``lfga_scaled: true`` adds it). The key projection
  has no bias: a key bias adds q_i·b to every energy of row i, which the softmax cancels, so it would be a
  parameter that never receives a gradient.
- Stage outputs are timm's: x1..x5 and y3..y5 are the raw block sums (the next block starts with its own ReLU),
  y6 is bn4's output, unrectified, as the IJCAI release's ``fea_part3`` gives it to the bilinear fusion
  (``exit_relu: true`` adds timm's act4, the ReLU after bn4).
- Classification: 2-class softmax cross-entropy (as released; equivalent to 1-logit BCE). The 2048→4096 Linear
  has no bias because a BatchNorm follows (the bias would get an exactly zero gradient).
- Pixel head (``pixel_head: true``, as the IJCAI release): its loss is the pixel cross-entropy against the full
  S×S crop mask, averaged over the pixels of the samples that have a mask (reals count: their mask is empty);
  a fake without a mask (SSPSL) gets no pixel loss, since it has no pixel truth. ``pixel_head: false`` builds
  Locate-and-Verify's network (patch head only; then ``mask_head`` must be ``patch``).
- Labels may be soft (mixup): the losses use probability targets. Patch ground truth: a pixel is manipulated when
  its mask value is > 0.5 (the repository's v > 127 rule); a patch is 1 when any pixel of its window is.
- SSPSL embeddings: ``sspsl_embedding: x5`` (default: L2-normalised x5, no projection that no loss could train)
  or ``fixed_random`` (a fixed 728→256 random projection kept as a buffer, seeded, not a parameter). The fake
  anchor is the batch mean over all pseudo-labelled fakes' reference cells (``sspsl_fake_anchor: batch``, as
  released) or each sample's own (``sample``). A fake without mask is skipped by the localization loss (and
  counted in the ``sspsl_skipped`` loss part) when its ``ref_box`` is NaN / empty or the batch holds no real image.
- Pretrained weights: ``pretrained`` names ImageNet Xception weights for both backbones (the releases' start):
  a local .pth / .safetensors file, a save_pretrained folder or a hub id found in the local cache, never
  downloaded (models/pretrained.py); loading is strict. ``scratch`` (the default; null too) trains from random
  initialisation. ``pretrained_hub`` was removed (only ``false`` is accepted, for old model files).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..normalize import lfdl_input
from ..srm import srm_residuals
from .recipes import WORKFLOW_KEYS

log = logging.getLogger(__name__)

BACKBONE = "legacy_xception"
RGB_UNUSED = ("block12", "conv3", "bn3", "act3", "conv4", "bn4", "act4", "global_pool", "fc")  # RGB exit flow + head
SRM_UNUSED = ("global_pool", "fc")  # the SRM stream keeps its exit flow (y6) but not timm's classifier
LOC_CHANNELS = (64, 128, 256, 728, 728, 728)  # x0 (stem) .. x5 (blocks 8–11)
CLS_CHANNELS = (64, 128, 256, 728, 728)  # y0, y1, y2, y3, y5
EXIT_CHANNELS = 2048
MPFF_CHANNELS = 512
MIDDLE = (range(4, 8), range(8, 12))  # blocks 4–7, blocks 8–11
MASK_HEADS = ("pixel", "patch")


# ----------------------------------------------------------------------------------------------- grid helpers
def feature_sides(size: int, stem_padding: int) -> tuple[int, ...]:
    """Sides of the stem, block1, block2, block3, blocks 4–7, blocks 8–11 and exit-flow outputs for an S×S input."""
    s0 = (size + 2 * stem_padding - 3) // 2 + 1  # conv1: 3×3, stride 2
    s0 = s0 + 2 * stem_padding - 2  # conv2: 3×3, stride 1

    def down(s: int) -> int:  # MaxPool2d(3, 2, 1) ending blocks 1, 2, 3, 12 (their 1×1 stride-2 skip agrees)
        return (s - 1) // 2 + 1

    s1 = down(s0)
    s2 = down(s1)
    s3 = down(s2)
    return (s0, s1, s2, s3, s3, s3, down(s3))


def pad_to_multiple(x: Tensor, n: int) -> Tensor:
    """Replicate-pad the two spatial dims (half before, the rest after) so that each side is a multiple of ``n``."""
    ph, pw = (-x.shape[-2]) % n, (-x.shape[-1]) % n
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")


def grid_max_pool(x: Tensor, n: int) -> Tensor:
    """Max-pool a square (B, C, H, H) map onto an n×n grid after padding H to a multiple of n."""
    x = pad_to_multiple(x, n)
    k = x.shape[-1] // n
    return x if k == 1 else F.max_pool2d(x, k, k)


def box_grid(ref_box: Tensor, size: int, grid: int) -> Tensor:
    """(B, 4) rectangles x0, y0, x1, y1 in S×S pixels → (B, G, G) bool cells touched; a NaN box touches none.

    A pixel i is inside when its square [i, i+1) overlaps [x0, x1) (so any box of positive area covers a pixel);
    the pixel mask is then pooled like the ground-truth masks.
    """
    idx = torch.arange(size, device=ref_box.device, dtype=torch.float32)
    box = ref_box.float()
    inx = (idx[None] + 1 > box[:, 0:1]) & (idx[None] < box[:, 2:3])  # NaN compares False
    iny = (idx[None] + 1 > box[:, 1:2]) & (idx[None] < box[:, 3:4])
    pix = (iny[:, :, None] & inx[:, None, :]).float()[:, None]
    return grid_max_pool(pix, grid)[:, 0] > 0


def sspsl_labels(emb: Tensor, real: Tensor, pseudo: Tensor, region: Tensor, per_sample: bool = False) -> Tensor:
    """SSPSL pseudo patch labels (eq. 7–10).

    emb (B, D, G, G) patch embeddings (normalised here); real (B,) bool: real images, their patches form the real
    anchor; pseudo (B,) bool: fakes to label; region (B, G, G) bool: reference cells of each fake. The fake anchor
    is the mean of the pseudo fakes' reference-cell embeddings over the batch, or per sample with ``per_sample``.
    A pseudo fake's patch is 1 when cos(p, fake anchor) > cos(p, real anchor); every other patch is 0.
    Returns (B, G, G) float. Without a real image (or a reference cell) an anchor is zero and its cosine 0: the
    caller gives such samples no loss weight.
    """
    e = F.normalize(emb.float(), dim=1)
    reals = real.float()[:, None, None, None]  # weighted means, no boolean indexing: no host synchronisation
    real_anchor = (e * reals).sum((0, 2, 3)) / (reals.sum() * e.shape[-1] * e.shape[-2]).clamp_min(1)  # (D,)
    cells = (region & pseudo[:, None, None]).float()[:, None]  # (B, 1, G, G)
    if per_sample:
        fake_anchor = (e * cells).sum((2, 3)) / cells.sum((2, 3)).clamp_min(1)  # (B, D)
    else:
        fake_anchor = ((e * cells).sum((0, 2, 3)) / cells.sum().clamp_min(1)).expand(e.shape[0], -1)
    cos_fake = F.cosine_similarity(e, fake_anchor[:, :, None, None], dim=1)
    cos_real = F.cosine_similarity(e, real_anchor[None, :, None, None], dim=1)
    return ((cos_fake > cos_real) & pseudo[:, None, None]).float()


# ------------------------------------------------------------------------------------------------- modules
class CMCE(nn.Module):
    """Cross-modality consistency enhancement (eq. 1–3): cosine-weighted exchange between the streams, no weights."""

    def __init__(self, use_updated_rgb: bool = True):
        super().__init__()
        self.use_updated_rgb = use_updated_rgb

    def forward(self, rgb: Tensor, srm: Tensor) -> tuple[Tensor, Tensor]:
        c = F.cosine_similarity(rgb, srm, dim=1).unsqueeze(1).to(rgb.dtype)  # (B, 1, H, W); fp32 under autocast
        rgb_u = rgb + c * srm
        srm_u = srm + c * (rgb_u if self.use_updated_rgb else rgb)
        return F.relu(rgb_u), F.relu(srm_u)

    def extra_repr(self) -> str:
        return f"use_updated_rgb={self.use_updated_rgb}"


class LFGA(nn.Module):
    """Localization-feature-guided attention (eq. 4–5): queries and keys from RGB, values from SRM; SRM changes."""

    def __init__(self, channels: int = 728, ratio: int = 4, scaled: bool = False):
        super().__init__()
        self.query = nn.Conv2d(channels, channels // ratio, 1)
        self.key = nn.Conv2d(channels, channels // ratio, 1, bias=False)  # a key bias is cancelled by the softmax
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.scale = (channels // ratio) ** -0.5 if scaled else 1.0

    def forward(self, srm: Tensor, rgb: Tensor) -> Tensor:
        b, c, h, w = srm.shape

        def tokens(t: Tensor) -> Tensor:  # (B, C', H, W) → (B, 1 head, HW, C')
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        q, k, v = tokens(self.query(rgb)), tokens(self.key(rgb)), tokens(self.value(srm))
        att = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # softmax over the HW key positions
        att = att.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return F.relu(srm + self.gamma.to(att.dtype) * att)


class MPFF(nn.Module):
    """Multi-scale patch feature fusion (eq. 6): per-window similarity of a finer map with the x5 map, no weights."""

    def __init__(self, c: float = 1.0):
        super().__init__()
        self.c = float(c)

    def forward(self, fine: Tensor, coarse: Tensor) -> Tensor:
        g = coarse.shape[-1]
        fine = pad_to_multiple(fine, g)
        w = fine.shape[-1] // g
        up = coarse if w == 1 else F.interpolate(coarse, scale_factor=w, mode="nearest")
        m = torch.tanh(fine * up / self.c).sum(1, keepdim=True)  # (B, 1, wG, wG)
        return F.pixel_unshuffle(m, w)  # (B, w², G, G): each w×w window unfolded to channels (as nn.Unfold)

    def extra_repr(self) -> str:
        return f"c={self.c}"


def projection(cin: int, cout: int = MPFF_CHANNELS) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LocalizationHead(nn.Module):
    """MPFF over x0..x5 projected to 512 channels, concatenated with x5 → BN, ReLU, 1×1 conv → 2 logits per patch."""

    def __init__(self, windows: tuple[int, ...], c: float = 1.0):
        super().__init__()
        self.proj = nn.ModuleList(projection(ch) for ch in LOC_CHANNELS)
        self.mpff = MPFF(c)
        width = sum(w * w for w in windows) + LOC_CHANNELS[-1]
        self.head = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.Conv2d(width, 2, 1, bias=False))

    def forward(self, feats: list[Tensor]) -> Tensor:
        p = [proj(f) for proj, f in zip(self.proj, feats)]
        maps = [self.mpff(f, p[-1]) for f in p[:-1]]
        return self.head(torch.cat(maps + [feats[-1]], dim=1))


class PixelHead(nn.Module):
    """The IJCAI release's ``seg_header2`` on x5: 3×3 728→256, BN, ReLU, 3×3 256→64, BN, ReLU, 1×1 64→2 (no
    biases, as released), then the logits are upsampled (bilinear, half-pixel centres) to the S×S crop."""

    def __init__(self, channels: int = LOC_CHANNELS[-1]):
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(channels, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 2, 1, bias=False),
        )

    def forward(self, x5: Tensor, size: int) -> Tensor:
        return F.interpolate(self.head(x5), size=(size, size), mode="bilinear", align_corners=False)


class ClassificationHead(nn.Module):
    """Multi-level SRM features pooled to P×P, bilinear (Hadamard) fusion with the exit flow, → 2 logits."""

    def __init__(self, hidden: int = 2048, width: int = 4096, dropout: float = 0.5):
        super().__init__()
        self.proj_levels = nn.Linear(sum(CLS_CHANNELS), hidden)
        self.proj_exit = nn.Linear(EXIT_CHANNELS, hidden)
        self.drop1 = nn.Dropout(dropout)
        self.expand = nn.Linear(hidden, width, bias=False)  # BatchNorm follows: a bias would get no gradient
        self.bn = nn.BatchNorm2d(width)
        self.drop2 = nn.Dropout(dropout)
        self.fc = nn.Linear(width, 2)

    def forward(self, levels: list[Tensor], exit_flow: Tensor) -> Tensor:
        p = exit_flow.shape[-1]
        a = torch.cat([grid_max_pool(y, p) for y in levels], dim=1)  # (B, 1904, P, P)
        z = torch.tanh(self.proj_levels(a.permute(0, 2, 3, 1)) * self.proj_exit(exit_flow.permute(0, 2, 3, 1)))
        z = self.expand(self.drop1(z)).permute(0, 3, 1, 2)  # (B, 4096, P, P)
        z = F.relu(self.bn(z)).mean((2, 3))
        return self.fc(self.drop2(z))


def xception_backbone(stem_padding: int, unused: tuple[str, ...]) -> nn.Module:
    """timm's legacy_xception (random init: weights come from ``LFDL.load_backbone_weights``) with the stem
    padding set and the modules LFDL never calls deleted."""
    net = timm.create_model(BACKBONE, pretrained=False)
    for conv in (net.conv1, net.conv2):
        conv.padding = (stem_padding, stem_padding)
    for name in unused:
        delattr(net, name)
    return net


def stem(net: nn.Module, x: Tensor) -> Tensor:
    x = net.act1(net.bn1(net.conv1(x)))
    return net.act2(net.bn2(net.conv2(x)))


def blocks(net: nn.Module, x: Tensor, ids: range) -> Tensor:
    for i in ids:
        x = getattr(net, f"block{i}")(x)
    return x


def exit_flow(net: nn.Module, x: Tensor, relu: bool = False) -> Tensor:
    """block12, sepconv3 + BN + ReLU, sepconv4 + BN (+ ReLU with ``relu``: timm's act4; the release stops at bn4)."""
    x = net.block12(x)
    x = net.act3(net.bn3(net.conv3(x)))
    x = net.bn4(net.conv4(x))
    return net.act4(x) if relu else x


# --------------------------------------------------------------------------------------------------- network
class LFDL(nn.Module):
    """Two-stream face-crop detector and localizer; protocol of CONTRACTS.md (forward / loss / predict_proba).

    ``forward(batch)`` returns ``cls`` (B, 2) logits, ``loc`` (B, 2, G, G) patch logits, ``pix`` (B, 2, S, S)
    pixel logits (with ``pixel_head``) and ``x5`` (B, 728, G, G), the RGB feature SSPSL embeds.
    """

    name = "lfdl"

    def __init__(
        self,
        size: int = 299,
        *,
        stem_padding: int = 0,
        pretrained: str | None = "scratch",
        pretrained_hub: bool = False,
        cmce_use_updated_rgb: bool = True,
        lfga_scaled: bool = False,
        mpff_c: float = 1.0,
        sspsl_embedding: str = "x5",
        sspsl_fake_anchor: str = "batch",
        dropout: float = 0.5,
        pixel_head: bool = True,
        mask_head: str = "pixel",
        exit_relu: bool = False,
        **workflow: Any,
    ):
        super().__init__()
        unknown = sorted(set(workflow) - WORKFLOW_KEYS)
        if unknown:
            raise UserError(f"lfdl: unknown option(s) {', '.join(unknown)}; expected stem_padding, pretrained, "
                            "pretrained_hub, cmce_use_updated_rgb, lfga_scaled, mpff_c, sspsl_embedding, "
                            "sspsl_fake_anchor, dropout, pixel_head, mask_head, exit_relu")
        _check("stem_padding", stem_padding, stem_padding in (0, 1), "0 (IJCAI release, timm) or 1 (Locate-and-Verify)")
        _check("mpff_c", mpff_c, isinstance(mpff_c, (int, float)) and mpff_c > 0, "a positive number")
        _check("sspsl_embedding", sspsl_embedding, sspsl_embedding in ("x5", "fixed_random"), "x5 or fixed_random")
        _check("sspsl_fake_anchor", sspsl_fake_anchor, sspsl_fake_anchor in ("batch", "sample"), "batch or sample")
        _check("pixel_head", pixel_head, isinstance(pixel_head, bool), "true or false")
        _check("exit_relu", exit_relu, isinstance(exit_relu, bool), "true or false")
        _check("mask_head", mask_head, mask_head in MASK_HEADS, "pixel or patch")
        _check("mask_head", mask_head, pixel_head or mask_head == "patch",
               "patch when pixel_head is false (there is no pixel head to take the masks from)")
        _check("pretrained_hub", pretrained_hub, pretrained_hub is False,
               "false: it was removed; name the weights in lfdl.pretrained (a file, a folder or a hub id such as "
               "legacy_xception.tf_in1k, found in the local cache; `morphfuse weights download` fetches them)")
        sides = feature_sides(int(size), stem_padding)
        _check("size", size, sides[-1] >= 1, f"a side of at least 32 px (got feature sides {sides})")

        self.size = int(size)
        self.grid = sides[5]  # G: side of x5
        self.cls_grid = sides[6]  # P: side of the exit-flow output
        windows = tuple(-(-s // self.grid) for s in sides[:5])  # window w of x0..x4 after padding to a multiple of G
        self.geometry = {"feature_sides": list(sides), "grid": self.grid, "cls_grid": self.cls_grid,
                         "mpff_windows": list(windows), "loc_channels": sum(w * w for w in windows) + 728,
                         "stem_padding": stem_padding, "pixel_head": pixel_head, "mask_head": mask_head,
                         "mask_side": self.size if mask_head == "pixel" else self.grid}
        self.sspsl_fake_anchor = sspsl_fake_anchor
        self.exit_relu = exit_relu

        self.rgb = xception_backbone(stem_padding, RGB_UNUSED)
        self.srm = xception_backbone(stem_padding, SRM_UNUSED)
        self.cmce = nn.ModuleList(CMCE(cmce_use_updated_rgb) for _ in range(3))
        self.lfga = nn.ModuleList(LFGA(728, scaled=lfga_scaled) for _ in range(3))
        self.localize = LocalizationHead(windows, mpff_c)
        self.pixel = PixelHead() if pixel_head else None
        self.mask_head = mask_head
        self.classify = ClassificationHead(dropout=dropout)
        if sspsl_embedding == "fixed_random":  # seeded, so every run (and every checkpoint) has the same one
            g = torch.Generator(device="cpu").manual_seed(0)
            self.register_buffer("sspsl_proj", torch.randn(256, 728, generator=g, device="cpu") / 728 ** 0.5)
        else:
            self.sspsl_proj = None
        self.pretrained_report: dict[str, dict[str, Any]] = {}
        if pretrained is not None:
            self.pretrained_report = self.load_backbone_weights(pretrained)

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        rgb = batch["rgb"]
        if rgb.ndim != 4 or rgb.shape[1] != 3 or tuple(rgb.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"LFDL was built for (B, 3, {self.size}, {self.size}) inputs; got {tuple(rgb.shape)}")
        x = lfdl_input(rgb)
        srm = batch.get("srm")
        srm = srm.to(x.dtype) if srm is not None else srm_residuals(x)  # srm_residuals works on meta too
        R, S = self.rgb, self.srm

        x0, y0 = self.cmce[0](stem(R, x), stem(S, srm))
        x1, y1 = self.cmce[1](R.block1(x0), S.block1(y0))
        x2, y2 = self.cmce[2](R.block2(x1), S.block2(y1))
        merged = x2 + y2  # block3 of both streams takes the same input
        x3 = R.block3(merged)
        y3 = self.lfga[0](S.block3(merged), x3)
        x4 = blocks(R, x3, MIDDLE[0])
        y4 = self.lfga[1](blocks(S, y3, MIDDLE[0]), x4)
        x5 = blocks(R, x4, MIDDLE[1])
        y5 = self.lfga[2](blocks(S, y4, MIDDLE[1]), x5)
        y6 = exit_flow(S, y5, self.exit_relu)

        out = {"cls": self.classify([y0, y1, y2, y3, y5], y6),
               "loc": self.localize([x0, x1, x2, x3, x4, x5]),
               "x5": x5}
        if self.pixel is not None:
            out["pix"] = self.pixel(x5, self.size)
        return out

    # ----------------------------------------------------------------------------------------------- loss
    def patch_embeddings(self, x5: Tensor) -> Tensor:
        """SSPSL patch embeddings (B, D, G, G), L2-normalised over D; no gradient (labels are hard comparisons)."""
        e = x5.detach().float()
        if self.sspsl_proj is not None:
            e = torch.einsum("dc,bchw->bdhw", self.sspsl_proj.float(), e)
        return F.normalize(e, dim=1)

    def patch_targets(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict]:
        """Per-patch fake targets (B, G, G) in {0, 1}, per-sample loss weights (B,) and SSPSL counts (0-d tensors)."""
        loc = out["loc"]
        b, g, dev = loc.shape[0], loc.shape[-1], loc.device
        fake = batch["label"].to(dev).float() > 0.5
        mask = batch.get("mask")
        has_mask = batch.get("has_mask")
        has_mask = (torch.full((b,), mask is not None, device=dev) if has_mask is None
                    else has_mask.to(dev).bool())
        target = torch.zeros(b, g, g, device=dev)
        if mask is not None:
            mask = mask.to(dev).float()
            mask = mask[:, None] if mask.ndim == 3 else mask  # (B, S, S) accepted too
            gt = grid_max_pool((mask > 0.5).float(), g)[:, 0]
            target = torch.where(has_mask[:, None, None], gt, target)
        pseudo = fake & ~has_mask  # fakes without a mask: SSPSL
        ref = batch.get("ref_box")
        region = (box_grid(ref.to(dev), self.size, g) if ref is not None
                  else torch.zeros(b, g, g, dtype=torch.bool, device=dev))
        real = ~fake
        usable = pseudo & region.flatten(1).any(1) & real.any()  # tensors throughout: no host synchronisation
        labels = sspsl_labels(self.patch_embeddings(out["x5"]), real, usable, region,
                              per_sample=self.sspsl_fake_anchor == "sample")
        target = torch.where(usable[:, None, None], labels, target)
        weight = (~pseudo | usable).float()  # reals, fakes with a mask, and pseudo-labelled fakes
        stats = {"sspsl_samples": usable.sum(), "sspsl_skipped": (pseudo & ~usable).sum()}
        return target, weight, stats

    def pixel_loss(self, pix: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Pixel cross-entropy of the S×S logits against the crop mask (> 0.5 is manipulated), averaged over the
        pixels of the samples that have a mask; 0 when none has one."""
        b, dev = pix.shape[0], pix.device
        mask = batch.get("mask")
        if mask is None:
            return pix.sum() * 0.0
        mask = mask.to(dev).float()
        mask = mask[:, None] if mask.ndim == 3 else mask
        target = (mask[:, 0] > 0.5).float()
        has_mask = batch.get("has_mask")
        weight = (torch.ones(b, device=dev) if has_mask is None else has_mask.to(dev).float())
        ce = F.cross_entropy(pix, torch.stack([1 - target, target], 1), reduction="none")  # (B, S, S)
        n = weight.sum() * ce.shape[-1] * ce.shape[-2]
        return (ce * weight[:, None, None]).sum() / n.clamp_min(1)

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """L = L_cls + L_loc (+ L_pix with the pixel head), softmax cross-entropies with probability targets (soft
        labels allowed), 1:1:1 as in the IJCAI release (cls + seg1 + seg2)."""
        cls, loc = out["cls"].float(), out["loc"].float()
        y = batch["label"].to(cls.device).float()
        loss_cls = F.cross_entropy(cls, torch.stack([1 - y, y], 1))
        target, weight, stats = self.patch_targets(out, batch)
        ce = F.cross_entropy(loc, torch.stack([1 - target, target], 1), reduction="none")  # (B, G, G)
        n = weight.sum() * ce.shape[-1] * ce.shape[-2]
        loss_loc = (ce * weight[:, None, None]).sum() / n.clamp_min(1)  # mean over the supervised patches
        total = loss_cls + loss_loc
        names = ["loss", "loss_cls", "loss_loc"]
        parts = [loss_cls, loss_loc]
        if "pix" in out:
            loss_pix = self.pixel_loss(out["pix"].float(), batch)
            total = total + loss_pix
            names.append("loss_pix")
            parts.append(loss_pix)
        names += list(stats)
        values = torch.stack([total.detach(), *(p.detach() for p in parts),
                              *(v.float() for v in stats.values())]).tolist()
        return total, dict(zip(names, values))  # one host synchronisation for all parts

    @torch.no_grad()
    def predict_proba(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Face score (B,) = softmax fake probability; mask = fake probability of the pixel head (B, 1, S, S), or
        of the patch head (B, 1, G, G) with ``mask_head: patch`` (call .eval())."""
        out = self.forward(batch)
        logits = out["pix"] if self.mask_head == "pixel" else out["loc"]
        return out["cls"].float().softmax(1)[:, 1], logits.float().softmax(1)[:, 1:2]

    # ------------------------------------------------------------------------------------------ pretrained
    def load_backbone_weights(self, spec: str | Path) -> dict[str, dict[str, Any]]:
        """Load ImageNet Xception weights into both backbones, strictly (models/pretrained.py for what ``spec`` may
        be: a .pth / .safetensors file, a save_pretrained folder, a hub id in the local cache).

        timm's ``legacy_xception`` layout and Cadene's (2-D pointwise weights, as the IJCAI release's
        ``xception-b5690688.pth``) are accepted. Every tensor of each backbone must come from the file; the only
        tensors the file may hold beyond them are those of the modules LFDL deletes (the classifier ``fc``, and
        the RGB stream's exit flow). Anything else missing or unexpected is a UserError listing the keys.
        Returns, per stream, the file, the number of tensors loaded and the file's tensors left unused.
        """
        from .pretrained import read_state_dict, resolve, strict_report

        path = resolve(spec, "lfdl.pretrained")
        if path is None:
            return {}
        sd = read_state_dict(path, "lfdl.pretrained")
        sd = {k: v[..., None, None] if k.endswith("pointwise.weight") and v.ndim == 2 else v  # Cadene layout
              for k, v in sd.items()}
        report: dict[str, dict[str, Any]] = {}
        for name, net, dropped in (("rgb", self.rgb, RGB_UNUSED), ("srm", self.srm, SRM_UNUSED)):
            own = net.state_dict()
            bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                   for k in sd if k in own and sd[k].shape != own[k].shape]
            if bad:
                raise UserError(f"lfdl.pretrained = {path}: shapes differ from legacy_xception: {', '.join(bad[:5])}")
            missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
            unexpected = [k for k in sd if k not in own and k.split(".")[0] not in dropped]
            strict_report("lfdl.pretrained", path, f"the {name} stream's Xception (timm legacy_xception)",
                          missing, unexpected)
            net.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
            unused = sorted(k for k in sd if k not in own)
            report[name] = {"file": str(path), "loaded": len(own) - len([k for k in own if k not in sd]),
                            "unused": unused}
            log.info("lfdl.pretrained %s -> %s stream: %d tensors loaded, unused (modules LFDL drops): %s",
                     path, name, report[name]["loaded"], _summarise(unused))
        return report


def _check(key: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise UserError(f"lfdl.{key} = {value!r}: must be {expected}")


def _summarise(keys: list[str]) -> list[str]:
    """Top-level module names of a key list (block12.rep.1... → block12) for a one-line log."""
    return sorted({k.split(".")[0] for k in keys})
