"""Random checkpoints in the original (PyTorch) key layouts, for converter and parity tests."""
from __future__ import annotations

import numpy as np
import torch

TINY_DIT = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32, in_dim=16, out_dim=16)


def wan_dit_state_dict(*, dim, ffn_dim, num_layers, text_dim, freq_dim, in_dim, out_dim, i2v=False,
                       seed=0, std=0.1, **_) -> dict[str, torch.Tensor]:
    """Every key and shape of wan_components.md §2.2, random normal(std); norms 1 + noise."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * std
    one = lambda *s: 1.0 + torch.randn(*s, generator=g) * std
    D, F = dim, ffn_dim
    sd = {
        "patch_embedding.weight": r(D, in_dim, 1, 2, 2), "patch_embedding.bias": r(D),
        "text_embedding.0.weight": r(D, text_dim), "text_embedding.0.bias": r(D),
        "text_embedding.2.weight": r(D, D), "text_embedding.2.bias": r(D),
        "time_embedding.0.weight": r(D, freq_dim), "time_embedding.0.bias": r(D),
        "time_embedding.2.weight": r(D, D), "time_embedding.2.bias": r(D),
        "time_projection.1.weight": r(6 * D, D), "time_projection.1.bias": r(6 * D),
        "head.modulation": r(1, 2, D), "head.head.weight": r(4 * out_dim, D), "head.head.bias": r(4 * out_dim),
    }
    for i in range(num_layers):
        b = f"blocks.{i}."
        sd[b + "modulation"] = r(1, 6, D)
        for a in ("self_attn", "cross_attn"):
            for n in "qkvo":
                sd[f"{b}{a}.{n}.weight"] = r(D, D)
                sd[f"{b}{a}.{n}.bias"] = r(D)
            sd[f"{b}{a}.norm_q.weight"] = one(D)
            sd[f"{b}{a}.norm_k.weight"] = one(D)
        sd[b + "norm3.weight"] = one(D)
        sd[b + "norm3.bias"] = r(D)
        sd[b + "ffn.0.weight"] = r(F, D)
        sd[b + "ffn.0.bias"] = r(F)
        sd[b + "ffn.2.weight"] = r(D, F)
        sd[b + "ffn.2.bias"] = r(D)
        if i2v:
            for n in ("k_img", "v_img"):
                sd[f"{b}cross_attn.{n}.weight"] = r(D, D)
                sd[f"{b}cross_attn.{n}.bias"] = r(D)
            sd[f"{b}cross_attn.norm_k_img.weight"] = one(D)
    if i2v:
        sd["img_emb.proj.0.weight"] = one(1280)
        sd["img_emb.proj.0.bias"] = r(1280)
        sd["img_emb.proj.1.weight"] = r(1280, 1280) * 0.3
        sd["img_emb.proj.1.bias"] = r(1280)
        sd["img_emb.proj.3.weight"] = r(D, 1280) * 0.3
        sd["img_emb.proj.3.bias"] = r(D)
        sd["img_emb.proj.4.weight"] = one(D)
        sd["img_emb.proj.4.bias"] = r(D)
    return sd


def save_safetensors(sd: dict, path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
