"""LFDL: shapes at several input sizes, parameter count, gradients, SSPSL labels, overfitting, determinism, info CLI.

Heavy checks run on the meta device (shapes, counts) or at tiny sides (S = 40, 64, 96) on one CPU thread.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from morphfuse.cli import main
from morphfuse.errors import UserError
from morphfuse.models import build_model
from morphfuse.models.lfdl import (
    CMCE, LFDL, LFGA, MPFF, box_grid, feature_sides, grid_max_pool, sspsl_labels,
)

RELEASE_PARAMS = 63_429_742  # the release's Two_Stream_Net, counted on its code
RELEASE_DEAD = 8_351_924  # RGB exit flow 6,788,384 + 2 unused fc 8,196 + CMCE convs/BNs 1,550,976 + LFGA BNs 4,368
OUR_PARAMS = 55_072_951  # without the pixel head (Locate-and-Verify's network)
# The IJCAI release's seg_header2, counted by hand from its definition: 3×3 728→256 + BN, 3×3 256→64 + BN, 1×1 64→2.
PIXEL_HEAD_PARAMS = 728 * 256 * 9 + 2 * 256 + 256 * 64 * 9 + 2 * 64 + 64 * 2  # 1,825,536
NAN4 = [math.nan] * 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CI box is small and shared: one intra-op thread is several times faster than oversubscribed two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_batch(size: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """2 reals, 1 fake with a mask, 1 fake without (SSPSL, reference box given)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(4, 1, size, size)
    mask[2, :, size // 5: size // 2, size // 4: size * 3 // 5] = 1
    q = size / 4
    return {
        "rgb": torch.rand(4, 3, size, size, generator=g),
        "label": torch.tensor([0.0, 0.0, 1.0, 1.0]),
        "mask": mask,
        "has_mask": torch.tensor([True, True, True, False]),
        "ref_box": torch.tensor([NAN4, NAN4, NAN4, [q, q, 2 * q, 2 * q]]),
    }


@pytest.fixture(scope="module")
def model40():
    torch.manual_seed(0)
    return LFDL(40)


# ------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("size", [64, 96])
def test_forward_shapes_and_probabilities(size):
    torch.manual_seed(0)
    model = LFDL(size).eval()
    batch = {"rgb": torch.rand(2, 3, size, size)}
    out = model(batch)
    g, p = model.grid, model.cls_grid
    assert model.geometry["stem_padding"] == 0  # the IJCAI release's default
    assert (g, p) == (feature_sides(size, 0)[5], feature_sides(size, 0)[6])
    assert out["cls"].shape == (2, 2)
    assert out["loc"].shape == (2, 2, g, g)
    assert out["x5"].shape == (2, 728, g, g)
    assert out["pix"].shape == (2, 2, size, size)
    score, mask = model.predict_proba(batch)
    assert score.shape == (2,) and mask.shape == (2, 1, size, size)  # the pixel head's S×S map
    assert 0 <= float(score.min()) <= float(score.max()) <= 1 and 0 <= float(mask.min()) <= float(mask.max()) <= 1
    assert torch.allclose(mask, out["pix"].softmax(1)[:, 1:2])
    model.mask_head = "patch"  # the option: the patch head's G×G map
    _, patch = model.predict_proba(batch)
    assert patch.shape == (2, 1, g, g) and torch.allclose(patch, out["loc"].softmax(1)[:, 1:2])


def test_pixel_head_is_the_release_seg_header2_upsampled():
    """pix = bilinear(half-pixel) upsampling of 3×3-3×3-1×1 convolutions of x5, written out with F.conv2d."""
    torch.manual_seed(3)
    model = LFDL(64).eval()
    with torch.no_grad():
        for m in model.pixel.modules():  # non-trivial BN statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
        out = model({"rgb": torch.rand(1, 3, 64, 64)})
        c1, b1, _, c2, b2, _, c3 = model.pixel.head
        def bn(x, b):
            return (x - b.running_mean[:, None, None]) / (b.running_var[:, None, None] + b.eps).sqrt() \
                * b.weight[:, None, None] + b.bias[:, None, None]

        h = F.relu(bn(F.conv2d(out["x5"], c1.weight, padding=1), b1))
        h = F.relu(bn(F.conv2d(h, c2.weight, padding=1), b2))
        ref = F.interpolate(F.conv2d(h, c3.weight), size=(64, 64), mode="bilinear", align_corners=False)
    assert [c1.bias, c2.bias, c3.bias] == [None, None, None]
    assert tuple(c1.weight.shape) == (256, 728, 3, 3) and tuple(c3.weight.shape) == (2, 64, 1, 1)
    assert torch.allclose(out["pix"], ref, atol=1e-5)


def test_pixel_loss_is_pixel_cross_entropy_of_the_masked_samples(model40):
    """loss = cls + patch + pixel; the pixel term against a hand computation: mean over the pixels of the
    samples that have a mask (the SSPSL fake without a mask gets none)."""
    batch = make_batch(40)
    torch.manual_seed(0)
    g = model40.grid
    out = {"cls": torch.randn(4, 2), "loc": torch.randn(4, 2, g, g), "x5": torch.randn(4, 728, g, g),
           "pix": torch.randn(4, 2, 40, 40)}
    total, parts = model40.loss(out, batch)
    logp = out["pix"].log_softmax(1)
    m = batch["mask"][:, 0]
    nll = -(m * logp[:, 1] + (1 - m) * logp[:, 0])  # (4, 40, 40)
    ref = nll[:3].mean()  # samples 0-2 have a mask, sample 3 does not
    assert parts["loss_pix"] == pytest.approx(float(ref), rel=1e-5)
    assert parts["loss"] == pytest.approx(parts["loss_cls"] + parts["loss_loc"] + parts["loss_pix"], rel=1e-5)
    assert float(total) == pytest.approx(parts["loss"], rel=1e-6)
    nomask = {k: v for k, v in batch.items() if k != "mask"}
    assert model40.loss(out, nomask)[1]["loss_pix"] == 0


def test_exit_flow_stops_at_bn4_as_released():
    """y6 (what the classifier fuses) is bn4's output, unrectified, as the IJCAI release's fea_part3; with
    exit_relu timm's act4 follows: then the whole SRM path equals timm's own forward_features."""
    import timm

    from morphfuse.models.lfdl import exit_flow

    torch.manual_seed(0)
    net = timm.create_model("legacy_xception", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        h = net.act2(net.bn2(net.conv2(net.act1(net.bn1(net.conv1(x))))))
        for i in range(1, 12):
            h = getattr(net, f"block{i}")(h)
        y6, y6_relu, ref = exit_flow(net, h), exit_flow(net, h, relu=True), net.forward_features(x)
    assert float(y6.min()) < 0 and torch.equal(y6_relu, F.relu(y6))
    assert torch.allclose(y6_relu, ref, atol=1e-5)
    assert LFDL(64).exit_relu is False


def test_patch_only_network_is_locate_and_verify():
    with torch.device("meta"):
        model = LFDL(64, pixel_head=False, mask_head="patch")
        out = model({"rgb": torch.empty(1, 3, 64, 64)})
    assert model.pixel is None and "pix" not in out
    with pytest.raises(UserError, match="mask_head"):
        LFDL(64, pixel_head=False)  # masks from a pixel head that is not there
    with pytest.raises(UserError, match="mask_head"):
        LFDL(64, mask_head="pixels")


def test_precomputed_srm_is_used(model40):
    from morphfuse.srm import srm_residuals

    model40.eval()
    rgb = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        a = model40({"rgb": rgb})["x5"]
        b = model40({"rgb": rgb, "srm": srm_residuals((rgb - 0.5) / 0.5)})["x5"]
        c = model40({"rgb": rgb, "srm": torch.zeros(2, 3, 40, 40)})["x5"]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert (a - c).abs().max() > 1e-2 * a.abs().max()


@pytest.mark.parametrize("size,stem_padding,sides", [
    (299, 1, (150, 75, 38, 19, 19, 19, 10)),  # Locate-and-Verify
    (299, 0, (147, 74, 37, 19, 19, 19, 10)),  # the IJCAI release and timm: same G and P
    (512, 1, (256, 128, 64, 32, 32, 32, 16)),
])
def test_meta_shapes_at_paper_sizes(size, stem_padding, sides):
    with torch.device("meta"):
        model = LFDL(size, stem_padding=stem_padding).eval()
        out = model({"rgb": torch.empty(1, 3, size, size)})
    assert feature_sides(size, stem_padding) == sides
    g, p = sides[5], sides[6]
    assert (model.grid, model.cls_grid) == (g, p)
    assert out["loc"].shape == (1, 2, g, g) and out["cls"].shape == (1, 2)
    assert model.geometry["loc_channels"] == 728 + 64 + 16 + 4 + 1 + 1  # 814 as in the release at 299


def test_feature_sides_match_timm_at_odd_size():
    """The analytic geometry agrees with timm's actual layers (S = 77, both paddings)."""
    for pad in (0, 1):
        with torch.device("meta"):
            model = LFDL(77, stem_padding=pad)
            x = torch.empty(1, 3, 77, 77)
            r = model.rgb
            s0 = r.act2(r.bn2(r.conv2(r.act1(r.bn1(r.conv1(x))))))
            s1 = r.block1(s0)
            s2 = r.block2(s1)
            s3 = r.block3(s2)
            s6 = model.srm.block12(s3)
        got = (s0.shape[-1], s1.shape[-1], s2.shape[-1], s3.shape[-1], s6.shape[-1])
        exp = feature_sides(77, pad)
        assert got == (exp[0], exp[1], exp[2], exp[3], exp[6])


def test_wrong_input_size_is_an_error(model40):
    with pytest.raises(ValueError, match="built for"):
        model40({"rgb": torch.rand(1, 3, 48, 48)})


# ---------------------------------------------------------------------------------------- parameters
def test_parameter_count_vs_release():
    with torch.device("meta"):
        model = LFDL(299)
    n = sum(p.numel() for p in model.parameters())
    names = [k for k, _ in model.named_parameters()]
    print(f"\nLFDL parameters at 299: {n:,}; release {RELEASE_PARAMS:,} - dead {RELEASE_DEAD:,} = "
          f"{RELEASE_PARAMS - RELEASE_DEAD:,}; difference {RELEASE_PARAMS - RELEASE_DEAD - n:,} = SRM kernel held "
          "as a (frozen) parameter 225 + LFGA key biases 3×182 + bias before BatchNorm 4,096")
    assert n == RELEASE_PARAMS - RELEASE_DEAD - 225 - 3 * 182 - 4096 + PIXEL_HEAD_PARAMS == OUR_PARAMS + 1_825_536
    with torch.device("meta"):
        assert sum(p.numel() for p in LFDL(299, pixel_head=False, mask_head="patch").parameters()) == OUR_PARAMS
    dead = ("rgb.block12", "rgb.conv3", "rgb.bn3", "rgb.conv4", "rgb.bn4", "rgb.fc", "srm.fc")
    assert not [k for k in names if k.startswith(dead)]
    assert any(k.startswith("srm.conv4") for k in names)  # the SRM exit flow feeds the classifier


def test_fixed_random_embedding_is_a_buffer():
    with torch.device("meta"):
        model = LFDL(299, sspsl_embedding="fixed_random")
    assert "sspsl_proj" in dict(model.named_buffers())
    assert sum(p.numel() for p in model.parameters()) == OUR_PARAMS + PIXEL_HEAD_PARAMS
    with torch.device("meta"):  # the buffer is seeded: two builds agree
        other = LFDL(299, sspsl_embedding="fixed_random")
    assert torch.equal(model.sspsl_proj, other.sspsl_proj) and model.sspsl_proj.device.type == "cpu"


# ----------------------------------------------------------------------------------- training behaviour
def test_every_parameter_gets_a_gradient_and_a_tiny_batch_overfits():
    torch.manual_seed(0)
    model = LFDL(40)  # sides 17, 9, 5, 3, 3, 3, 2: G = 3, P = 2; the MPFF windows pad 17 → 18 and 5 → 6
    assert model.geometry["mpff_windows"] == [6, 3, 2, 1, 1]
    batch = make_batch(40)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    reached: set[str] = set()
    losses = []
    for step in range(4):
        total, parts = model.loss(model(batch), batch)
        assert parts["sspsl_samples"] == 1 and parts["sspsl_skipped"] == 0
        opt.zero_grad()
        total.backward()
        reached |= {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        losses.append(float(total.detach()))
        opt.step()
        if step == 0:  # LFGA γ starts at 0: its projections only get gradients once γ has moved
            assert all(f"lfga.{i}.gamma" in reached for i in range(3))
            assert not any(n.startswith("lfga") and not n.endswith("gamma") for n in reached)
    missing = [n for n, _ in model.named_parameters() if n not in reached]
    assert not missing, f"parameters without gradient after 4 steps: {missing}"
    print(f"\nlosses over 4 Adam steps on a fixed batch: {[round(v, 3) for v in losses]}")
    assert losses[-1] < 0.5 * losses[0]


def test_seeded_build_and_forward_are_deterministic():
    batch = make_batch(40)
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        model = LFDL(40)
        torch.manual_seed(7)  # dropout
        out = model(batch)
        results.append((model.state_dict(), out, model.loss(out, batch)[0]))
    (sd1, o1, l1), (sd2, o2, l2) = results
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert torch.equal(o1["cls"], o2["cls"]) and torch.equal(o1["loc"], o2["loc"]) and torch.equal(l1, l2)


# ------------------------------------------------------------------------------------------------ SSPSL
def _emb(cells):  # [[row0 cells], [row1 cells]] of 2-d vectors → (2, G, G)
    return torch.tensor(cells, dtype=torch.float32).permute(2, 0, 1)


def test_sspsl_labels_hand_made():
    real = _emb([[[1, 0], [1, 0]], [[1, 0], [1, 0]]])  # real anchor: (1, 0)
    fake = _emb([[[0, 1], [0.2, 1]], [[1, 0.2], [1, 0]]])  # reference cell (0, 0): fake anchor (0, 1)
    other = _emb([[[0, 1], [0, 1]], [[0, 1], [0, 1]]])  # a fake that has a mask: not pseudo-labelled
    emb = torch.stack([real, fake, other])
    region = torch.zeros(3, 2, 2, dtype=torch.bool)
    region[1, 0, 0] = True
    is_real = torch.tensor([True, False, False])
    pseudo = torch.tensor([False, True, False])
    for per_sample in (False, True):
        lab = sspsl_labels(emb * 3.0, is_real, pseudo, region, per_sample=per_sample)  # scale-free
        assert lab.tolist() == [[[0, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 0]]]


def test_sspsl_batch_and_sample_anchors_against_loops():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(5, 8, 3, 3, generator=g)
    is_real = torch.tensor([True, True, False, False, False])
    pseudo = torch.tensor([False, False, True, True, False])
    region = torch.rand(5, 3, 3, generator=g) > 0.5
    region[2, 0, 0] = region[3, 1, 1] = True
    e = F.normalize(emb, dim=1)
    r = torch.stack([e[b, :, i, j] for b in range(5) for i in range(3) for j in range(3) if is_real[b]]).mean(0)
    cells = {b: [e[b, :, i, j] for i in range(3) for j in range(3) if region[b, i, j]] for b in (2, 3)}
    batch_anchor = torch.stack(cells[2] + cells[3]).mean(0)
    for per_sample in (False, True):
        lab = sspsl_labels(emb, is_real, pseudo, region, per_sample=per_sample)
        for b in range(5):
            f = torch.stack(cells[b]).mean(0) if per_sample and b in cells else batch_anchor
            for i in range(3):
                for j in range(3):
                    p = e[b, :, i, j]
                    exp = bool(pseudo[b]) and float(F.cosine_similarity(p, f, dim=0)) > float(
                        F.cosine_similarity(p, r, dim=0))
                    assert lab[b, i, j] == float(exp)


def test_patch_targets_and_fallbacks(model40):
    g = model40.grid
    batch = make_batch(40)
    out = {"loc": torch.zeros(4, 2, g, g), "x5": torch.randn(4, 728, g, g)}
    target, weight, stats = model40.patch_targets(out, batch)
    assert {k: int(v) for k, v in stats.items()} == {"sspsl_samples": 1, "sspsl_skipped": 0}
    assert weight.tolist() == [1, 1, 1, 1]
    assert target[:2].sum() == 0  # reals
    assert torch.equal(target[2], grid_max_pool(batch["mask"][2:3], g)[0, 0])  # ground truth
    # no reference box → that fake is skipped (weight 0) and counted
    nobox = dict(batch, ref_box=torch.tensor([NAN4] * 4))
    _, weight, stats = model40.patch_targets(out, nobox)
    assert weight.tolist() == [1, 1, 1, 0] and {k: int(v) for k, v in stats.items()} == {"sspsl_samples": 0,
                                                                                         "sspsl_skipped": 1}
    # no real image in the batch → no real anchor → skipped
    noreal = dict(batch, label=torch.ones(4), has_mask=torch.tensor([True, True, True, False]))
    _, weight, stats = model40.patch_targets(out, noreal)
    assert weight.tolist() == [1, 1, 1, 0] and stats["sspsl_skipped"] == 1
    # a loss over only skipped samples is finite and keeps the graph
    loc = torch.zeros(4, 2, g, g, requires_grad=True)
    allskip = dict(batch, has_mask=torch.zeros(4, dtype=torch.bool), label=torch.ones(4))
    total, parts = model40.loss({"cls": torch.zeros(4, 2, requires_grad=True), "loc": loc,
                                 "x5": out["x5"]}, allskip)
    total.backward()
    assert parts["loss_loc"] == 0 and parts["sspsl_skipped"] == 4


def test_ground_truth_and_reference_box_pooling():
    mask = torch.zeros(1, 1, 299, 299)
    mask[0, 0, 298, 298] = 1  # last pixel → last cell (299 is padded to 304, window 16)
    mask[0, 0, 0, 0] = 1
    cells = grid_max_pool(mask, 19)[0, 0]
    assert cells.shape == (19, 19) and cells[0, 0] == 1 and cells[18, 18] == 1 and cells.sum() == 2
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [32.0, 16.0, 48.0, 31.0], NAN4])
    grid = box_grid(boxes, 64, 4)  # window 16
    assert grid[0].nonzero().tolist() == [[0, 0]]  # a sub-pixel box still touches its pixel
    assert grid[1].nonzero().tolist() == [[1, 2]]
    assert not grid[2].any()


# ------------------------------------------------------------------------------------------ modules
def test_cmce_release_and_paper_variants():
    rgb = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    srm = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)
    c = 1 / math.sqrt(2)
    r, s = CMCE(True)(rgb, srm)
    ru = rgb + c * srm
    assert torch.allclose(r, ru.relu()) and torch.allclose(s, (srm + c * ru).relu())
    _, s_paper = CMCE(False)(rgb, srm)
    assert torch.allclose(s_paper, (srm + c * rgb).relu())
    assert sum(p.numel() for p in CMCE().parameters()) == 0


@pytest.mark.parametrize("scaled", [False, True])
def test_lfga_matches_explicit_softmax_attention(scaled):
    torch.manual_seed(0)
    m = LFGA(8, ratio=4, scaled=scaled)
    srm, rgb = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    assert torch.equal(m(srm, rgb), srm.relu())  # γ = 0
    with torch.no_grad():
        m.gamma.fill_(0.7)
    q = m.query(rgb).flatten(2)  # (B, 2, N)
    k = m.key(rgb).flatten(2)
    v = m.value(srm).flatten(2)  # (B, 8, N)
    energy = q.transpose(1, 2) @ k * (2 ** -0.5 if scaled else 1.0)  # (B, N, N), row = query position
    att = (v @ energy.softmax(-1).transpose(1, 2)).view(2, 8, 3, 3)  # the release's bmm form
    assert torch.allclose(m(srm, rgb), (srm + 0.7 * att).relu(), atol=1e-5)


def test_mpff_matches_unfold_reference():
    torch.manual_seed(0)
    fine, coarse = torch.randn(2, 5, 10, 10), torch.randn(2, 5, 4, 4)  # 10 → pad 12 (1 before, 1 after), w = 3
    got = MPFF(c=2.0)(fine, coarse)
    padded = F.pad(fine, (1, 1, 1, 1), mode="replicate")
    up = coarse.repeat_interleave(3, 2).repeat_interleave(3, 3)
    m = torch.tanh(padded * up / 2.0).sum(1, keepdim=True)
    ref = nn.Unfold(3, stride=3)(m).view(2, 9, 4, 4)
    assert got.shape == (2, 9, 4, 4) and torch.allclose(got, ref, atol=1e-6)


# --------------------------------------------------------------------------------------- options, I/O
def test_options_are_validated_and_workflow_keys_dropped():
    with torch.device("meta"):
        with pytest.raises(UserError, match="stem_padding"):
            LFDL(64, stem_padding=2)
        with pytest.raises(UserError, match="unknown option"):
            LFDL(64, stem_pading=1)
        with pytest.raises(UserError, match="sspsl_embedding"):
            LFDL(64, sspsl_embedding="learned")
        model = build_model("lfdl", 64, {"size": 160, "stem_padding": 0, "train": {"lr": 1}, "gpus": 1,
                                         "paper": {}, "pretrained": None, "mpff_c": 1.0})
    assert model.size == 64 and model.geometry["stem_padding"] == 0
    with pytest.raises(UserError, match="unknown"):
        build_model("nope", 64, {})


# Pretrained weights (every format into both streams, strict loading): tests/test_pretrained.py


def test_info_cli_prints_json(capsys):
    assert main(["info", "lfdl", "--size", "299"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == OUR_PARAMS + PIXEL_HEAD_PARAMS
    assert info["parameters_by_module"]["pixel"] == PIXEL_HEAD_PARAMS
    assert info["outputs"]["loc"] == [1, 2, 19, 19] and info["outputs"]["cls"] == [1, 2]
    assert info["outputs"]["pix"] == [1, 2, 299, 299]
    assert info["geometry"]["grid"] == 19 and info["geometry"]["cls_grid"] == 10
    assert info["geometry"]["pixel_head"] is True and info["geometry"]["mask_head"] == "pixel"
    # pixel head: 2·361·(728·256·9 + 256·64·9 + 64·2) = 1.317 GFLOPs on the 19×19 grid
    assert info["forward_gflops_by_module"]["pixel"] == pytest.approx(
        2 * 361 * (728 * 256 * 9 + 256 * 64 * 9 + 128) / 1e9, abs=1e-3
    )
    # the release's 43.0 (without seg_header2) less its discarded RGB exit flow (~2.0), plus the pixel head
    assert 41.3 < info["forward_gflops"] < 44.3
    assert abs(sum(info["forward_gflops_by_module"].values()) - info["forward_gflops"]) < 1e-2
