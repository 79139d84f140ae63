"""UMT5 text encoder: parity with transformers.UMT5EncoderModel, converter, TextEncoder.

Random weights are made in the *original* Wan layout (wan_components.md 3.4), mapped to HF keys
with the table in 3.4 for the oracle (strict load) and converted with ``converters.t5`` for wanjax.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import wanjax  # noqa: F401
from converters import t5 as conv
from converters.common import ConversionError, TensorSource, materialize, unflatten_params
from wanjax.checkpoint import load_model
from wanjax.models.t5 import T5Config, T5Encoder, get_t5_config, relative_position_bucket
from wanjax.text import TextEncoder, TextEncoderError, clean_prompt, load_text_encoder, load_tokenizer

CFG = get_t5_config("tiny")  # vocab 128, dim 32, 4 heads x 8, ffn 64, 2 layers (spec section 9)


def wan_state_dict(cfg: T5Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Every key of Wan's T5Encoder (encoder only) with random values, std 0.3 (norms 1 + 0.1 noise)."""
    rng = np.random.default_rng(seed)
    w = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
    n = lambda d: (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    sd = {"token_embedding.weight": w(cfg.vocab_size, cfg.dim), "norm.weight": n(cfg.dim)}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = n(cfg.dim)
        for k in "qkv":
            sd[p + f"attn.{k}.weight"] = w(cfg.dim_attn, cfg.dim)
        sd[p + "attn.o.weight"] = w(cfg.dim, cfg.dim_attn)
        sd[p + "pos_embedding.embedding.weight"] = w(cfg.num_buckets, cfg.num_heads)
        sd[p + "norm2.weight"] = n(cfg.dim)
        sd[p + "ffn.gate.0.weight"] = w(cfg.ffn_dim, cfg.dim)
        sd[p + "ffn.fc1.weight"] = w(cfg.ffn_dim, cfg.dim)
        sd[p + "ffn.fc2.weight"] = w(cfg.dim, cfg.ffn_dim)
    return sd


def wan_to_hf(sd: dict[str, np.ndarray], cfg: T5Config) -> dict[str, np.ndarray]:
    """The mapping table of wan_components.md 3.4 (written independently of converters/t5.py)."""
    out = {"shared.weight": sd["token_embedding.weight"], "encoder.embed_tokens.weight": sd["token_embedding.weight"],
           "encoder.final_layer_norm.weight": sd["norm.weight"]}
    for i in range(cfg.num_layers):
        w, h = f"blocks.{i}.", f"encoder.block.{i}.layer."
        out[h + "0.layer_norm.weight"] = sd[w + "norm1.weight"]
        for k in "qkvo":
            out[h + f"0.SelfAttention.{k}.weight"] = sd[w + f"attn.{k}.weight"]
        out[h + "0.SelfAttention.relative_attention_bias.weight"] = sd[w + "pos_embedding.embedding.weight"]
        out[h + "1.layer_norm.weight"] = sd[w + "norm2.weight"]
        out[h + "1.DenseReluDense.wi_0.weight"] = sd[w + "ffn.gate.0.weight"]
        out[h + "1.DenseReluDense.wi_1.weight"] = sd[w + "ffn.fc1.weight"]
        out[h + "1.DenseReluDense.wo.weight"] = sd[w + "ffn.fc2.weight"]
    return out


def hf_oracle(sd: dict[str, np.ndarray], cfg: T5Config):
    from transformers import UMT5Config, UMT5EncoderModel

    hcfg = UMT5Config(vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim,
                      num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                      relative_attention_num_buckets=cfg.num_buckets,
                      relative_attention_max_distance=cfg.max_distance, feed_forward_proj="gated-gelu",
                      layer_norm_epsilon=cfg.eps, dropout_rate=0.0, tie_word_embeddings=False)
    model = UMT5EncoderModel(hcfg).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in wan_to_hf(sd, cfg).items()}, strict=True)
    return model


def wanjax_model(src: TensorSource, cfg: T5Config) -> T5Encoder:
    """T5Encoder filled through our converter plan (in memory)."""
    params = materialize(src, conv.t5_plan(src, cfg), conv.t5_targets(cfg))
    model = T5Encoder(cfg, rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, unflatten_params(params))
    nnx.update(model, state)
    return model


def batch(lengths, total, vocab, seed=0):
    """ids [B, total] with random tokens, EOS (1) at length-1 and pad (0) after; mask [B, total]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (len(lengths), total)).astype(np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, n - 1], ids[b, n:], mask[b, :n] = 1, 0, 1
    return ids, mask


@pytest.fixture(scope="module")
def sd():
    return wan_state_dict(CFG)


def test_relative_buckets_match_hf_and_spec():
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    att = UMT5Attention(UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                   d_model=32, d_kv=8, num_heads=4), has_relative_attention_bias=True)
    pos = torch.arange(512)
    ref = att._relative_position_bucket(pos[None, :] - pos[:, None]).numpy()
    ours = relative_position_bucket(512, 512, 32, 128)
    assert np.array_equal(ours, ref)  # all 512x512 positions, exact
    # Values quoted in the spec (rel = key - query): 1..8 -> 17..24, 16 -> 26, 32 -> 28, 64 -> 30, -128 -> 15.
    row = ours[0]
    assert list(row[[0, 1, 8, 16, 32, 64, 100]]) == [0, 17, 24, 26, 28, 30, 31] and ours[128, 0] == 15


def test_parity_with_hf_umt5(sd):
    oracle = hf_oracle(sd, CFG)
    ours = wanjax_model(TensorSource.from_arrays(sd), CFG)
    # Batch of 2 with different lengths and right padding (all positions, padded queries included),
    # then L=64 with no padding (relative distances up to 63 -> buckets 0..30 exercised).
    for lengths, total in (((13, 40), 40), ((64,), 64)):
        ids, mask = batch(lengths, total, CFG.vocab_size)
        with torch.no_grad():
            ref = oracle(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
        got = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
        scale = float(np.abs(ref).max())
        err = float(np.abs(got - ref).max())
        # fp32 on both sides. Measured: 7.3e-6 (L=40, scale 3.1) and 2.8e-5 (L=64, scale 3.6); against an
        # fp64 HF run we are off by 1.2e-5 / 2.6e-5 and HF fp32 itself by 1.0e-5 / 2.4e-5, i.e. pure fp32
        # rounding (logits are unscaled). 1e-4 x scale leaves ~3x headroom; a real bug gives O(scale).
        assert got.shape == ref.shape == (len(lengths), total, CFG.dim)
        assert scale > 0.5 and err <= 1e-4 * scale, (lengths, err, scale)


def _convert(path, out, *extra):
    assert conv.main(["--src", str(path), "--out", str(out), *extra]) == 0
    return out


def test_wan_pth_and_hf_safetensors_convert_identically(sd, tmp_path):
    from safetensors.numpy import save_file

    pth = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
    st = tmp_path / "umt5_hf.safetensors"
    save_file(wan_to_hf(sd, CFG), str(st))
    a = _convert(pth, tmp_path / "from_wan", "--dtype", "float32")
    b = _convert(st, tmp_path / "from_hf", "--dtype", "float32", "--preset", "tiny")
    cfg_a = json.loads((a / "config.json").read_text())
    assert cfg_a["model"] == "t5" and cfg_a["source_layout"] == "wan"
    assert T5Config.from_dict(cfg_a) == CFG  # --preset auto inferred the tiny shapes
    assert json.loads((b / "config.json").read_text())["source_layout"] == "hf"

    build = lambda c, rngs: T5Encoder(T5Config.from_dict(c), rngs=rngs)
    ma, mb = load_model(a, build), load_model(b, build)
    ids, mask = batch((7, 20), 20, CFG.vocab_size, seed=3)
    ya, yb = ma(jnp.asarray(ids), jnp.asarray(mask)), mb(jnp.asarray(ids), jnp.asarray(mask))
    assert np.array_equal(np.asarray(ya), np.asarray(yb))  # same weights, same program: bit-identical
    # and equal to the in-memory plan (so the Orbax round trip lost nothing)
    ref = wanjax_model(TensorSource.from_arrays(sd), CFG)(jnp.asarray(ids), jnp.asarray(mask))
    assert np.array_equal(np.asarray(ya), np.asarray(ref))


@pytest.mark.parametrize("case", ["missing", "shape"])
def test_converter_errors_name_the_key_and_leave_nothing(sd, tmp_path, case):
    bad = dict(sd)
    if case == "missing":
        key = "blocks.1.ffn.fc1.weight"
        del bad[key]
    else:
        key = "blocks.1.attn.k.weight"
        bad[key] = np.zeros((CFG.dim_attn, CFG.dim - 2), np.float32)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    pth = src_dir / "t5.pth"
    torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, pth)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        conv.main(["--src", str(pth), "--out", str(work / "t5"), "--dtype", "float32"])
    assert os.listdir(work) == []  # neither the output nor a temporary/work directory remains


def test_hf_tied_embedding_copies_must_agree(sd):
    hf = wan_to_hf(sd, CFG)
    hf["shared.weight"] = hf["shared.weight"] + 1.0
    src = TensorSource.from_arrays(hf)
    with pytest.raises(ConversionError, match="shared.weight"):
        materialize(src, conv.t5_plan(src, CFG), conv.t5_targets(CFG))


# ------------------------------------------------------------------------------------------------
# TextEncoder end to end with a tokenizer trained here
# ------------------------------------------------------------------------------------------------
SENTENCES = ["a cat sits on the mat", "the quick brown fox jumps over the lazy dog",
             "a person dances in the rain", "video of a dog running on the beach at sunset",
             "hello world and friends", "a red car drives down an empty street at night"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("\n".join(SENTENCES * 5))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=48,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(d / "sp.model"))
    # transformers 5 builds T5Tokenizer from the (piece, score) list; the vocab_file form is gone.
    tok = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                      extra_ids=0)
    out = d / "umt5-tiny"
    tok.save_pretrained(str(out))
    assert tok.encode("a cat") == sp.encode("a cat") + [1]  # T5 convention: EOS id 1 appended
    return out


def test_text_encoder_end_to_end(sd, tmp_path, tokenizer_dir):
    pth = tmp_path / "t5.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
    ckpt = _convert(pth, tmp_path / "t5", "--dtype", "float32")
    cache = tmp_path / "cache"
    te = load_text_encoder(ckpt, tokenizer_dir, dtype=jnp.float32, cache_dir=cache)

    prompts = ["  a cat\n sits  on the &amp;amp; mat ", "the quick brown fox jumps over the lazy dog"]
    assert clean_prompt(prompts[0]) == "a cat sits on the & mat"
    ctx = te.encode(prompts)
    assert ctx.shape == (2, 512, CFG.dim) and ctx.dtype == jnp.float32

    # Reference: encoder on all 512 positions with the mask, then Wan's trim at mask.sum().
    tok = load_tokenizer(tokenizer_dir)
    enc = tok([clean_prompt(p) for p in prompts], padding="max_length", truncation=True, max_length=512,
              return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ref = np.asarray(te.encoder(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    got = np.asarray(ctx)
    for b, p in enumerate(prompts):
        n = int(mask[b].sum())
        assert n == len(tok(clean_prompt(p))["input_ids"]) and ids[b, n - 1] == 1  # includes EOS
        np.testing.assert_allclose(got[b, :n], ref[b, :n], rtol=0, atol=1e-6)  # jit vs eager, same math
        assert np.abs(got[b, :n]).min(axis=-1).max() > 0 and not got[b, n:].any()  # zero-padded to 512
    assert int(mask[0].sum()) != int(mask[1].sum())

    # In-memory cache hit (order swapped), then a fresh encoder served from the disk cache.
    assert te.stats == {"hits": 0, "disk_hits": 0, "misses": 2}
    again = te.encode(prompts[::-1])
    assert te.stats["hits"] == 2 and te.stats["misses"] == 2
    assert np.array_equal(np.asarray(again), got[::-1])
    assert len([p for p in cache.iterdir() if p.suffix == ".npy" and not p.name.startswith(".")]) == 2
    te2 = load_text_encoder(ckpt, tokenizer_dir, dtype=jnp.float32, cache_dir=cache)
    assert np.array_equal(np.asarray(te2.encode(prompts)), got)
    assert te2.stats == {"hits": 0, "disk_hits": 2, "misses": 0}

    # Truncation keeps 512 tokens with the EOS last, so no row is zero.
    long = te.encode([" ".join(SENTENCES * 40)])
    assert np.abs(np.asarray(long)[0]).max(axis=-1).min() > 0

    with pytest.raises(TextEncoderError, match="empty prompt list"):
        te.encode([])


def test_tokenizer_dir_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TextEncoderError, match=r"nope.*tokenizer_config\.json"):
        load_tokenizer(missing)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TextEncoderError, match=r"partial.*tokenizer\.json or spiece\.model"):
        load_tokenizer(partial)


def test_text_encoder_bf16_and_vocab_check(tokenizer_dir):
    """bf16 compute returns bf16 context; a tokenizer larger than the vocabulary is refused."""
    tok = load_tokenizer(tokenizer_dir)
    enc = T5Encoder(CFG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ctx = TextEncoder(enc, tok, use_cache=False, text_len=64)(["a cat"])  # 64: bf16 on CPU is slow
    assert ctx.dtype == jnp.bfloat16 and ctx.shape == (1, 64, CFG.dim)
    n = len(tok("a cat")["input_ids"])
    assert np.abs(np.asarray(ctx[0, :n], np.float32)).min(axis=-1).min() > 0 and not np.asarray(ctx[0, n:]).any()
    small = T5Encoder(T5Config(vocab_size=8, dim=16, num_heads=2, head_dim=8, ffn_dim=32, num_layers=1),
                      rngs=nnx.Rngs(0))
    with pytest.raises(TextEncoderError, match="outside the encoder vocabulary"):
        TextEncoder(small, tok)(["the quick brown fox"])
