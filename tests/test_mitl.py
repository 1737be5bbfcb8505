"""MITL (models/mitl.py): shapes, cost against the release, training behaviour, DCT bands, checkpoints.

Small inputs (64 px, batch 1-2) on CPU; the 512-px cost is counted on the meta device (no memory, no compute).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode
from transformers import SegformerConfig, SegformerModel

from mit_layouts import nvlabs_mit_keys

from morphfuse.dct import dct_bands
from morphfuse.errors import UserError
from morphfuse.models.mitl import (
    MITL,
    WeightingNet,
    convnext_tiny_features,
    load_convnext_checkpoint,
    load_segformer_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# Release (Mesorch, random init): 85.75 M parameters. Ours drops ConvNeXt's classifier (head norm 2*768 + fc
# 768*1000+1000) and keeps the stems' biases (96 + 64) that the release's rebuilt stems lack.
CONVNEXT_HEAD = 2 * 768 + 768 * 1000 + 1000
STEM_BIASES = 96 + 64
PARTS = {  # our parameter counts, exact
    "convnext": 27_823_200,
    "mit": 44_081_536,
    "decoders": 7_963_680 + 4_326_144,   # ConvNeXt chains, MiT chains
    "heads": 4 * 97 + 4 * 65,
    "weighting": 788_360,
}


def _batch(n: int = 2, h: int = 64, w: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 1, h, w)
    mask[0, :, h // 8: h // 2, w // 4: 3 * w // 4] = 1
    if n > 1:
        mask[1, :, h // 2:, : w // 2] = 1
    return {"rgb": torch.rand(n, 3, h, w, generator=g), "mask": mask}


def _build(seed: int = 0, **options) -> MITL:
    torch.manual_seed(seed)
    return MITL(size=64, **options)


def _meta(**options) -> MITL:
    with torch.device("meta"):
        return MITL(**{"size": 512, **options})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads per process cost 3x the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> MITL:
    return _build(0).eval()


# ------------------------------------------------------------------------------------------------- shapes
def test_maps_and_weights_at_quarter_resolution(model):
    out = model(_batch(2))
    assert out["logits"].shape == (2, 1, 64, 64)
    assert out["maps"].shape == (2, 8, 16, 16)
    assert out["weights"].shape == (2, 8, 16, 16)
    assert (out["weights"] >= 0).all()
    torch.testing.assert_close(out["weights"].sum(1), torch.ones(2, 16, 16))


def test_non_square_multiple_of_32_and_bf16_autocast(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch(1, 64, 96))
    assert out["logits"].shape == (1, 1, 64, 96)
    assert out["maps"].shape == out["weights"].shape == (1, 8, 16, 24)
    assert out["logits"].dtype == out["weights"].dtype == torch.float32
    torch.testing.assert_close(out["weights"].sum(1), torch.ones(1, 16, 24))


def test_sides_must_be_multiples_of_32(model):
    with pytest.raises(ValueError, match="multiples of 32"):
        model({"rgb": torch.rand(1, 3, 80, 64)})
    with pytest.raises(UserError, match="multiple of 32"):
        _meta(size=200)


def test_options_are_checked_and_the_config_block_is_accepted():
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())["mitl"]
    m = _meta(**cfg)  # size, low_band, pretrained, score, train, gpus, paper
    assert (m.size, m.low_band, m.score_rule, m.score_percent) == (cfg["size"], "l_shape", "top_percent", 1.0)
    for bad, match in [({"low_band": "round"}, "low_band"), ({"score": {"rule": "mean"}}, "score.rule"),
                       ({"score": {"percent": 0}}, "percent"), ({"dropout": 0.1}, "unknown option"),
                       ({"pretrained": {"resnet": None}}, "pretrained")]:
        with pytest.raises(UserError, match=match):
            _meta(**bad)


# ------------------------------------------------------------------------------------------ cost vs release
def test_parameter_count_against_release():
    m = _meta()
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in m.named_children()}
    assert counts == PARTS
    total = sum(p.numel() for p in m.parameters())
    assert total == 84_983_568
    release = total + CONVNEXT_HEAD - STEM_BIASES
    assert release == 85_753_944 and round(release / 1e6, 2) == 85.75


def test_gflops_at_512_against_release():
    """Release: ConvNeXt 46.7, MiT-B3 74.0, decoders 21.7, weighting net 95.7, DCT 6.4 (full transform); 244.6.

    Counted on meta tensors, where SDPA runs as its math decomposition (bmm) and so is counted; on CPU tensors
    FlopCounterMode has no formula for the fused CPU SDPA kernel and would miss the 11.8 GFLOPs of attention.
    """
    m = _meta().eval()
    meta = lambda: torch.zeros(1, 3, 512, 512, device="meta")  # noqa: E731
    counter = FlopCounterMode(display=False, depth=3)
    with counter, torch.no_grad():
        m({"rgb": meta(), "dct_high": meta(), "dct_low": meta()})
    per = {k: sum(v.values()) / 1e9 for k, v in counter.get_flop_counts().items()}
    per["MITL.decoders"] = sum(per[f"MITL.decoders.{i}"] for i in range(8) if f"MITL.decoders.{i}" in per)
    assert per["MITL.convnext"] == pytest.approx(46.7, abs=0.05)
    assert per["MITL.mit"] == pytest.approx(74.0, abs=0.05)
    assert per["MITL.decoders"] == pytest.approx(21.7, abs=0.05)
    assert per["MITL.weighting"] == pytest.approx(95.7, abs=0.05)
    dct_counter = FlopCounterMode(display=False)
    with dct_counter:
        dct_bands(torch.rand(1, 3, 512, 512))
    dct = dct_counter.get_total_flops() / 1e9
    assert dct < 0.25  # low-rank projectors instead of the release's 6.4-GFLOP full transforms
    total = per["MITL"] + dct
    assert total == pytest.approx(244.6 - 6.4 + dct, abs=0.1)  # 238.4


# ------------------------------------------------------------------------------- AMW fusion (inference only)
# At 512 the AMW block runs at 256x256: the 1x1 convolutions 192->768 and 768->192 cost 2 * 2*192*768 FLOPs per
# pixel, which fusing removes (the 3x3 192->192 stays, now with the composed weights).
FUSION_SAVING_512 = 2 * 2 * 192 * 768 * 256 * 256 / 1e9  # 38.65 GFLOPs


@contextmanager
def _count_calls(module: torch.nn.Module):
    calls: list[int] = []
    hook = module.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def _pre_softmax(net: WeightingNet, x: torch.Tensor) -> torch.Tensor:
    """The AMW net's conv_out output, in the net's dtype (its softmax is computed in float32)."""
    seen = []
    hook = net.conv_out.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        net(x)
    finally:
        hook.remove()
    return seen[0]


def test_fused_amw_block_equals_the_three_convolutions_in_float64():
    torch.manual_seed(0)
    net = WeightingNet().double().eval()
    x = torch.randn(2, 9, 40, 56, dtype=torch.float64)
    with _count_calls(net.block[2]) as expand, torch.no_grad():
        ref = _pre_softmax(net, x)
        assert len(expand) == 1
        net.fuse()
        out = _pre_softmax(net, x)
        assert len(expand) == 1  # the fused path skipped the 1x1 convolutions
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    # The fused weights follow the parameters: new values (load_state_dict) and a new dtype rebuild them.
    torch.manual_seed(1)
    other = WeightingNet().double().eval()
    net.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_pre_softmax(net, x), _pre_softmax(other, x), rtol=0, atol=1e-10)
        net.float()
        assert _pre_softmax(net, x.float()).dtype == torch.float32


def test_fuse_for_inference_keeps_the_outputs_and_the_weights(model):
    batch = _batch(2)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(batch)
    try:
        assert model.fuse_for_inference() is model
        model.fuse_for_inference()  # idempotent
        with _count_calls(model.weighting.block[2]) as expand, torch.no_grad():
            out = model(batch)
            _, prob = model.predict_proba(batch)
        assert not expand  # fused path
        scale = float(ref["logits"].abs().max())
        assert float((out["logits"] - ref["logits"]).abs().max()) <= 1e-4 * scale
        torch.testing.assert_close(out["weights"], ref["weights"], rtol=0, atol=1e-5)
        assert torch.equal(out["maps"], ref["maps"])  # the encoders and decoders are untouched
        torch.testing.assert_close(prob, torch.sigmoid(ref["logits"]), rtol=0, atol=1e-5)
        assert list(model.state_dict()) == keys  # the fused weights are a cache, not state
        assert sum(p.numel() for p in model.parameters()) == sum(PARTS.values())
    finally:
        model.weighting.unfuse()


def test_training_after_fusing_uses_the_three_convolutions(model):
    convs = model.weighting.block[1:4]
    try:
        with pytest.raises(RuntimeError, match="eval"):
            model.train().fuse_for_inference()
        model.eval().fuse_for_inference()
        model.train()  # unfuses
        assert not model.weighting.fused
        with _count_calls(convs[1]) as expand:
            model.loss(model(_batch(1)), _batch(1))[0].backward()
            assert len(expand) == 1
            for conv in convs:
                assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
            # Eval mode with gradients asked for (e.g. attribution): the original convolutions too.
            model.zero_grad(set_to_none=True)
            model.eval().fuse_for_inference()
            model(_batch(1))["logits"].sum().backward()
            assert len(expand) == 2 and all(c.weight.grad is not None for c in convs)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        model.weighting.unfuse()


def test_fusing_saves_38_6_gflops_at_512():
    m = _meta().eval()
    meta = lambda: torch.zeros(1, 3, 512, 512, device="meta")  # noqa: E731

    def count() -> dict[str, float]:
        counter = FlopCounterMode(display=False, depth=2)
        with counter, torch.no_grad():
            m({"rgb": meta(), "dct_high": meta(), "dct_low": meta()})
        return {k: sum(v.values()) / 1e9 for k, v in counter.get_flop_counts().items()}

    before = count()
    m.fuse_for_inference()
    after = count()
    assert before["MITL"] - after["MITL"] == pytest.approx(FUSION_SAVING_512, abs=1e-6)
    assert FUSION_SAVING_512 == pytest.approx(38.65, abs=0.01)
    assert before["MITL.weighting"] == pytest.approx(95.7, abs=0.05)
    assert after["MITL.weighting"] == pytest.approx(95.7 - 38.65, abs=0.05)


def test_attention_runs_through_sdpa(model, monkeypatch):
    assert model.mit.config._attn_implementation == "sdpa"
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model(_batch(1))
    assert len(calls) == sum(model.mit.config.depths) == 28


# ------------------------------------------------------------------------------------------------ training
def test_training_reaches_every_parameter_and_overfits_a_tiny_batch():
    m = _build(0).train()
    batch = _batch(1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4)
    touched = {name: False for name, _ in m.named_parameters()}
    losses = []
    for _ in range(5):
        loss, parts = m.loss(m(batch), batch)
        loss.backward()
        for name, p in m.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            touched[name] |= bool(p.grad.abs().sum() > 0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(parts["bce"])
    assert all(touched.values()), [n for n, t in touched.items() if not t]
    assert losses[-1] < 0.75 * losses[0], losses


def test_deterministic_with_seed(model):
    other = _build(0)
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = _batch(2)
    outs = []
    for m in (model, other):
        m.train()  # stochastic depth on: the seed must fix it too
        torch.manual_seed(123)
        outs.append(m(batch)["logits"])
    model.eval()
    assert torch.equal(*outs)


# ------------------------------------------------------------------------------------------- DCT bands, output
def test_precomputed_bands_give_the_same_output(model):
    batch = _batch(1)
    x = (batch["rgb"] - MEAN) / STD
    high, low = dct_bands(x, "l_shape")
    on_the_fly = model(batch)
    stored = model({**batch, "dct_high": high, "dct_low": low})
    for key in ("logits", "maps", "weights"):
        assert torch.equal(on_the_fly[key], stored[key]), key
    # as stored in feature shards (float16): equal up to that rounding
    half = model({**batch, "dct_high": high.half(), "dct_low": low.half()})
    torch.testing.assert_close(half["logits"], on_the_fly["logits"], atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="both or neither"):
        model({**batch, "dct_high": high})


def test_square_low_band_changes_the_input():
    m = _meta(low_band="square")
    assert m.low_band == "square"
    x = torch.randn(1, 3, 64, 64)
    assert not torch.equal(dct_bands(x, "square")[1], dct_bands(x, "l_shape")[1])


def test_predict_proba_and_score_rules(model):
    score, prob = model.predict_proba(_batch(2))
    assert score.shape == (2,) and prob.shape == (2, 1, 64, 64)
    assert 0 <= float(prob.min()) and float(prob.max()) <= 1
    torch.testing.assert_close(score, model.score_from_mask(prob))

    prob = (torch.arange(100.0) / 100).view(1, 1, 10, 10)
    assert float(_meta(score={"rule": "max"}).score_from_mask(prob)[0]) == pytest.approx(0.99)
    top10 = _meta(score={"rule": "top_percent", "percent": 10}).score_from_mask(prob)
    assert float(top10[0]) == pytest.approx(0.945)         # mean of 0.90 .. 0.99
    top1 = _meta().score_from_mask(prob)                      # default 1 % of 100 px: the max
    assert float(top1[0]) == pytest.approx(0.99)


# --------------------------------------------------------------------------------------- encoders, checkpoints
def test_convnext_features_are_timm_features_only():
    with torch.device("meta"):
        ours = convnext_tiny_features()
        timms = timm.create_model("convnext_tiny", pretrained=False, features_only=True, in_chans=6)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in timms.state_dict().items()}
    assert ours.feature_info.channels() == [96, 192, 384, 768]
    assert ours.feature_info.reduction() == [4, 8, 16, 32]


def _check_stem(six: torch.Tensor, rgb: torch.Tensor) -> None:
    assert six.shape[1] == 6
    assert torch.equal(six[:, :3], rgb)
    fan_in = 3 * six.shape[2] * six.shape[3]
    assert float(six[:, 3:].std()) == pytest.approx((2 / fan_in) ** 0.5, rel=0.35)  # Kaiming normal


def test_convnext_checkpoint_widens_the_stem(tmp_path):
    tiny = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    rgb = timm.models.convnext.ConvNeXt(in_chans=3, **tiny)
    torch.save({"state_dict": rgb.state_dict()}, tmp_path / "convnext.pth")
    six = timm.models.convnext.ConvNeXt(in_chans=6, num_classes=10, **tiny)  # head differs: skipped
    load_convnext_checkpoint(six, tmp_path / "convnext.pth")
    src, dst = rgb.state_dict(), six.state_dict()
    _check_stem(dst["stem.0.weight"], src["stem.0.weight"])
    for k in src:
        if k != "stem.0.weight" and not k.startswith("head."):
            assert torch.equal(src[k], dst[k]), k
    with pytest.raises(UserError, match="no such file"):
        load_convnext_checkpoint(six, tmp_path / "missing.pth")
    torch.save({"stem.0.weight": torch.zeros(8, 3, 4, 4)}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="does not fit"):
        load_convnext_checkpoint(six, tmp_path / "partial.pth")


@pytest.mark.parametrize("layout", ["transformers_dir", "nvlabs_file", "segformer_file"])
def test_segformer_checkpoint_widens_the_stem(tmp_path, layout):
    tiny = dict(hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2], depths=[1, 2, 1, 1],
                sr_ratios=[8, 4, 2, 1], decoder_hidden_size=16)
    rgb = SegformerModel(SegformerConfig(num_channels=3, **tiny))
    src = rgb.state_dict()
    if layout == "transformers_dir":
        rgb.save_pretrained(tmp_path / "mit")
        path = tmp_path / "mit"
    else:
        path = tmp_path / "mit.pth"
        torch.save(nvlabs_mit_keys(src) if layout == "nvlabs_file" else src, path)
    six = SegformerModel(SegformerConfig(num_channels=6, **tiny))
    load_segformer_checkpoint(six, path)
    dst = six.state_dict()
    stem = "stages.0.patch_embeddings.proj.weight"
    _check_stem(dst[stem], src[stem])
    for k in src:
        if k != stem:
            assert torch.equal(src[k], dst[k]), k
