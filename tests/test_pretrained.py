"""Pretrained weights (models/pretrained.py and the loaders of lfdl.py / mitl.py): every accepted format loaded into
every backbone, strict loading, offline hub-id resolution, the planning check and the offline download error.

The checkpoints are written here: the real legacy_xception (LFDL builds it at S = 40, cheap) and tiny stand-ins of
ConvNeXt and MiT (same module classes, fewer and narrower blocks); one test loads real-size ConvNeXt-T / MiT-B3
weights through the MITL constructor. Nothing here touches the network: the hub caches are temporary folders laid
out as huggingface_hub and torch.hub lay them out.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from transformers import SegformerConfig, SegformerModel

from mit_layouts import nvlabs_mit_keys

from morphfuse.errors import UserError
from morphfuse.models.lfdl import LFDL
from morphfuse.models.mitl import MITL, load_convnext_checkpoint, load_segformer_checkpoint
from morphfuse.models.pretrained import missing_weights, resolve, weight_paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """Hub caches in temporary folders (empty unless a test fills them); no network from huggingface_hub."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(n)


def hf_cache_repo(cache: Path, repo: str, files: dict[str, Path], commit: str = "0" * 40) -> Path:
    """Lay out a repository in a Hugging Face cache as huggingface_hub does (refs/main → snapshots/<commit>)."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    for name, src in files.items():
        os.link(src, snap / name)
    return snap


# --------------------------------------------------------------------------------------------- Xception
@pytest.fixture(scope="module")
def xception_state():
    torch.manual_seed(11)
    return {k: v.clone() for k, v in timm.create_model("legacy_xception", pretrained=False).state_dict().items()}


def _assert_both_streams(model: LFDL, ref: dict) -> None:
    for net in (model.rgb, model.srm):
        own = net.state_dict()
        assert all(torch.equal(own[k], ref[k]) for k in own if not k.endswith("num_batches_tracked")), "weights differ"


def test_xception_every_format_into_both_lfdl_streams(tmp_path, xception_state):
    ref = xception_state
    pth = tmp_path / "xception.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.items()}}, pth)  # wrapped, DDP prefixes
    cadene = tmp_path / "xception-b5690688.pth"  # Cadene's layout: 2-D pointwise weights, no BN counters
    torch.save({k: (v[:, :, 0, 0] if k.endswith("pointwise.weight") else v) for k, v in ref.items()
                if not k.endswith("num_batches_tracked")}, cadene)
    st = tmp_path / "xception.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(st))
    folder = tmp_path / "xception_folder"  # a save_pretrained / `weights download` folder
    folder.mkdir()
    os.link(st, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    hub = tmp_path / "torch" / "hub" / "checkpoints"  # where timm caches legacy_xception.tf_in1k (a URL weight)
    hub.mkdir(parents=True)
    os.link(pth, hub / "xception-43020ad28.pth")
    snap = hf_cache_repo(tmp_path / "hf", "someone/xception", {"model.safetensors": st})

    specs = [str(pth), str(cadene), str(st), str(folder), "legacy_xception.tf_in1k", "someone/xception",
             "xception.pth"]  # the last: relative to the working directory
    for spec in specs:
        model = LFDL(40, pretrained=spec)
        _assert_both_streams(model, ref)
        rep = model.pretrained_report
        assert set(rep["rgb"]["unused"]) >= {"fc.weight", "block12.skip.weight", "conv4.pointwise.weight"}  # dropped
        assert rep["srm"]["unused"] == ["fc.bias", "fc.weight"]
    assert resolve("someone/xception", "lfdl.pretrained") == snap
    assert resolve("legacy_xception.tf_in1k", "lfdl.pretrained") == hub / "xception-43020ad28.pth"
    assert LFDL(40, pretrained="scratch").pretrained_report == {} and LFDL(40, pretrained=None).pretrained_report == {}


def test_xception_loading_is_strict(tmp_path, xception_state):
    ref = xception_state
    partial = {k: v for k, v in ref.items() if not k.startswith("block3.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"missing \[block3\.") as e:
        LFDL(40, pretrained=str(tmp_path / "partial.pth"))
    assert "unexpected" in str(e.value) and "\n" not in str(e.value)
    extra = dict(ref, **{"attention.qkv.weight": torch.zeros(3, 3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"0 tensor\(s\) missing, 1 unexpected \[attention\.qkv\.weight\]"):
        LFDL(40, pretrained=str(tmp_path / "extra.pth"))
    wrong = dict(ref, **{"conv1.weight": torch.zeros(16, 3, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="shapes differ"):
        LFDL(40, pretrained=str(tmp_path / "wrong.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable weights file"):
        LFDL(40, pretrained=str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="removed"):
        LFDL(40, pretrained_hub=True)


# ------------------------------------------------------------------------------------- ConvNeXt (tiny)
TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))


def _check_stem(six: torch.Tensor, rgb: torch.Tensor) -> None:
    assert six.shape[1] == 6 and torch.equal(six[:, :3], rgb)
    fan_in = 3 * six.shape[2] * six.shape[3]
    assert float(six[:, 3:].std()) == pytest.approx((2 / fan_in) ** 0.5, rel=0.35)  # Kaiming normal in 3-5


def test_convnext_every_format(tmp_path):
    torch.manual_seed(2)
    rgb = timm.models.convnext.ConvNeXt(in_chans=3, **TINY_CONVNEXT)
    src = rgb.state_dict()
    st = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in src.items()}, str(st))
    torch.save({"model": src}, tmp_path / "convnext.pth")
    folder = tmp_path / "convnext_folder"
    folder.mkdir()
    os.link(tmp_path / "convnext.pth", folder / "pytorch_model.bin")
    hf_cache_repo(tmp_path / "hf", "timm/convnext_tiny.in12k_ft_in1k", {"model.safetensors": st})
    for spec in (str(st), str(tmp_path / "convnext.pth"), str(folder), "convnext_tiny.in12k_ft_in1k",
                 "timm/convnext_tiny.in12k_ft_in1k"):
        six = timm.models.convnext.ConvNeXt(in_chans=6, num_classes=10, **TINY_CONVNEXT)  # head differs: skipped
        load_convnext_checkpoint(six, spec)
        dst = six.state_dict()
        _check_stem(dst["stem.0.weight"], src["stem.0.weight"])
        assert all(torch.equal(src[k], dst[k]) for k in src if k != "stem.0.weight" and not k.startswith("head."))
    with pytest.raises(UserError, match="not in the local cache"):
        load_convnext_checkpoint(six, "convnext_tiny.fb_in1k")
    torch.save({k: v for k, v in src.items() if not k.startswith("stages.3.")}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"missing \[stages\.3\."):
        load_convnext_checkpoint(six, str(tmp_path / "partial.pth"))


# ------------------------------------------------------------------------------------------ MiT (tiny)
TINY_MIT = dict(hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2], depths=[1, 2, 1, 1],
                sr_ratios=[8, 4, 2, 1], decoder_hidden_size=16)


def _old_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SegformerModel keys → the names transformers used before 5.x (nvidia/mit-b3's pytorch_model.bin), with the
    image-classification model's ``segformer.`` prefix and classifier."""
    out = {"classifier.weight": torch.zeros(1000, 32), "classifier.bias": torch.zeros(1000)}
    for key, v in state.items():
        _, s, rest = key.split(".", 2)
        if rest.startswith("patch_embeddings."):
            new = f"encoder.patch_embeddings.{s}." + rest.split(".", 1)[1]
        elif rest.startswith("layer_norm."):
            new = f"encoder.layer_norm.{s}." + rest.split(".", 1)[1]
        else:
            _, b, rest = rest.split(".", 2)
            for ours, theirs in [
                ("attention.q_proj", "attention.self.query"),
                ("attention.k_proj", "attention.self.key"),
                ("attention.v_proj", "attention.self.value"),
                ("attention.sequence_reduction.sequence_reduction", "attention.self.sr"),
                ("attention.sequence_reduction.layer_norm", "attention.self.layer_norm"),
                ("attention.o_proj", "attention.output.dense"),
                ("mlp.fc1", "mlp.dense1"),
                ("mlp.fc2", "mlp.dense2"),
                ("layernorm_before", "layer_norm_1"),
                ("layernorm_after", "layer_norm_2"),
            ]:
                rest = rest.replace(ours, theirs)
            new = f"encoder.block.{s}.{b}.{rest}"
        out["segformer." + new] = v
    return out


def test_segformer_every_format_and_layout(tmp_path):
    torch.manual_seed(4)
    rgb = SegformerModel(SegformerConfig(num_channels=3, **TINY_MIT))
    src = rgb.state_dict()
    rgb.save_pretrained(tmp_path / "mit_folder")  # transformers' save_pretrained
    save_file({k: v.contiguous() for k, v in nvlabs_mit_keys(src).items()}, str(tmp_path / "mit_b3.safetensors"))
    torch.save(nvlabs_mit_keys(src), tmp_path / "mit_b3.pth")  # the release's file layout
    torch.save(_old_transformers(src), tmp_path / "old_layout.bin")
    save_file({k: v.contiguous() for k, v in src.items()}, str(tmp_path / "segformer.safetensors"))
    hf_cache_repo(
        tmp_path / "hf",
        "nvidia/mit-b3",
        {
            "config.json": tmp_path / "mit_folder" / "config.json",
            "model.safetensors": tmp_path / "mit_folder" / "model.safetensors",
        },
    )
    stem = "stages.0.patch_embeddings.proj.weight"
    for spec in (str(tmp_path / "mit_folder"), str(tmp_path / "mit_b3.safetensors"), str(tmp_path / "mit_b3.pth"),
                 str(tmp_path / "old_layout.bin"), str(tmp_path / "segformer.safetensors"), "nvidia/mit-b3"):
        six = SegformerModel(SegformerConfig(num_channels=6, **TINY_MIT))
        load_segformer_checkpoint(six, spec)
        dst = six.state_dict()
        _check_stem(dst[stem], src[stem])
        assert all(torch.equal(src[k], dst[k]) for k in src if k != stem), spec
    partial = {k: v for k, v in nvlabs_mit_keys(src).items() if not k.startswith("block4.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"missing \[stages\.3\.blocks"):
        load_segformer_checkpoint(six, str(tmp_path / "partial.pth"))


# ----------------------------------------------------------------------------- real sizes, via the models
def test_mitl_loads_real_size_weights_from_the_hub_cache(tmp_path):
    """ConvNeXt-T and MiT-B3 of the real sizes, found by the paper config's hub ids in the local caches."""
    torch.manual_seed(0)
    conv = timm.create_model("convnext_tiny", pretrained=False)
    save_file({k: v.contiguous() for k, v in conv.state_dict().items()}, str(tmp_path / "convnext.safetensors"))
    from morphfuse.models.mitl import MIT_B3

    mit = SegformerModel(SegformerConfig(num_channels=3, **MIT_B3))
    mit.save_pretrained(tmp_path / "mit")
    hf_cache_repo(tmp_path / "hf", "timm/convnext_tiny.in12k_ft_in1k",
                  {"model.safetensors": tmp_path / "convnext.safetensors"})
    hf_cache_repo(tmp_path / "hf", "nvidia/mit-b3", {"config.json": tmp_path / "mit" / "config.json",
                                                     "model.safetensors": tmp_path / "mit" / "model.safetensors"})
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    model = MITL(64, pretrained=paper["mitl"]["pretrained"])
    ours = model.convnext.state_dict()
    assert torch.equal(ours["stages_3.blocks.2.conv_dw.weight"], conv.state_dict()["stages.3.blocks.2.conv_dw.weight"])
    assert torch.equal(ours["stem_0.weight"][:, :3], conv.state_dict()["stem.0.weight"])
    m = model.mit.state_dict()
    assert torch.equal(m["stages.2.blocks.17.mlp.fc2.weight"], mit.state_dict()["stages.2.blocks.17.mlp.fc2.weight"])


# ------------------------------------------------------------------------------------- planning check
def _paper_config() -> dict:
    from morphfuse.config import deep_update

    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    return deep_update(base, yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text()))


def test_paper_config_without_weights_names_each_missing_one(tmp_path, xception_state):
    cfg = _paper_config()
    msgs = missing_weights(cfg)
    assert len(msgs) == 3
    for msg, (key, hub) in zip(msgs, [("lfdl.pretrained", "legacy_xception.tf_in1k"),
                                      ("mitl.pretrained.convnext", "convnext_tiny.in12k_ft_in1k"),
                                      ("mitl.pretrained.segformer", "nvidia/mit-b3")]):
        assert msg.startswith(f"{key} = '{hub}'") and "morphfuse weights download" in msg and "\n" not in msg
    assert weight_paths(cfg) == []
    # the demo config trains from scratch: nothing is missing
    assert missing_weights(yaml.safe_load((ROOT / "config.yaml").read_text())) == []
    # weights in place: no message, and the paths are the rule inputs
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(xception_state, hub / "xception-43020ad28.pth")
    (tmp_path / "w.safetensors").write_bytes(b"x")  # resolution does not read the files
    (tmp_path / "config.json").write_text("{}")
    hf_cache_repo(
        tmp_path / "hf", "timm/convnext_tiny.in12k_ft_in1k", {"model.safetensors": tmp_path / "w.safetensors"}
    )
    hf_cache_repo(tmp_path / "hf", "nvidia/mit-b3", {"config.json": tmp_path / "config.json",
                                                     "model.safetensors": tmp_path / "w.safetensors"})
    assert missing_weights(cfg) == []
    assert len(weight_paths(cfg)) == 3 and len(weight_paths(cfg, "mitl")) == 2
    assert weight_paths(cfg, "lfdl") == [str(hub / "xception-43020ad28.pth")]


def test_weights_check_and_list_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "-m", "morphfuse", "weights", "check", "--config", str(ROOT / "config.yaml"),
                          str(ROOT / "configs" / "paper.yaml")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 1 and run.stdout.count("\n") == 3 and "nvidia/mit-b3" in run.stdout
    run = subprocess.run([sys.executable, "-m", "morphfuse", "weights", "list"], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    assert run.returncode == 0 and "legacy_xception.tf_in1k" in run.stdout and "xception-b5690688.pth" in run.stdout


# --------------------------------------------------------------------------------------- download offline
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused


@pytest.mark.parametrize("only", [[], ["convnext"], ["segformer"]])
def test_download_offline_is_one_line_error(tmp_path, only):
    port = _closed_port()
    dead = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "NO_PROXY", "no_proxy")}
    env.update(PYTHONPATH=str(ROOT / "src"), HF_ENDPOINT=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead, ALL_PROXY=dead,
               http_proxy=dead, https_proxy=dead, all_proxy=dead, HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_ETAG_TIMEOUT="3", HF_HUB_DOWNLOAD_TIMEOUT="3")
    cmd = [sys.executable, "-m", "morphfuse", "weights", "download", "--to", str(tmp_path / "w")]
    run = subprocess.run(cmd + (["--only", *only] if only else []), capture_output=True, text=True, env=env,
                         timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("morphfuse weights: error: weights download: cannot fetch"), lines
    assert "needs the network" in lines[0]
    assert not (tmp_path / "w" / "pretrained.yaml").exists()
