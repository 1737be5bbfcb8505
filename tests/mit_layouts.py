"""Checkpoint layouts of the MiT encoder as others publish them, for the tests of the MITL weight loaders."""
from __future__ import annotations

import torch


def nvlabs_mit_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SegformerModel keys → NVlabs' original MiT keys (the release's mit_b3.pth), written out here independently of
    the model's own converter (morphfuse.models.mitl), so that a test of the converter can fail."""
    out = {"head.weight": torch.zeros(1000, 32), "head.bias": torch.zeros(1000)}
    for key, v in state.items():
        s, rest = key.split(".", 2)[1:]
        s = int(s) + 1
        if rest.startswith("patch_embeddings."):
            out[f"patch_embed{s}." + rest.split(".", 1)[1].replace("layer_norm", "norm")] = v
        elif rest.startswith("layer_norm."):
            out[f"norm{s}." + rest.split(".", 1)[1]] = v
        else:
            b, rest = rest.split(".", 2)[1:]
            if rest.startswith("attention.k_proj."):
                out[f"block{s}.{b}.attn.kv.{rest.rsplit('.', 1)[1]}"] = torch.cat(
                    [v, state[key.replace("k_proj", "v_proj")]])
                continue
            if rest.startswith("attention.v_proj."):
                continue
            for ours, theirs in [("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                                 ("attention.q_proj", "attn.q"), ("attention.o_proj", "attn.proj"),
                                 ("attention.sequence_reduction.sequence_reduction", "attn.sr"),
                                 ("attention.sequence_reduction.layer_norm", "attn.norm")]:
                rest = rest.replace(ours, theirs)
            out[f"block{s}.{b}.{rest}"] = v
    return out
