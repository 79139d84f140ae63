"""Prompt -> text context for the DiT: tokenizer + UMT5 encoder + trim/zero-pad + cache.

Wan's text pipeline (wan_components.md 3.3, self_forcing.md 6.1):
clean (ftfy if importable, ``html.unescape`` twice, strip, collapse whitespace) -> tokenize with
``padding="max_length", truncation=True, max_length=512`` (EOS appended and kept) -> encode all 512
positions with the key-padding mask -> keep the first ``mask.sum()`` rows -> zero-pad back to 512.
The result ``[B, 512, dim]`` is exactly what the DiT's ``text_embedding`` expects.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import wanjax  # noqa: F401
from wanjax.models.t5 import T5Config, T5Encoder

TEXT_LEN = 512


class TextEncoderError(ValueError):
    """Bad text-encoder input or setup (missing tokenizer files, empty prompt list, ...)."""


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'``: ftfy (only if installed), html-unescape twice, collapse spaces."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """``transformers.AutoTokenizer`` from a local directory (e.g. ``<wan ckpt>/google/umt5-xxl``)."""
    d = Path(tokenizer_dir)
    expected = "tokenizer_config.json plus tokenizer.json and/or spiece.model"
    if not d.is_dir():
        raise TextEncoderError(f"tokenizer directory {d} does not exist; it must hold {expected} "
                               f"(the google/umt5-xxl tokenizer shipped with the Wan checkpoint)")
    missing = []
    if not (d / "tokenizer_config.json").exists():
        missing.append("tokenizer_config.json")
    if not ((d / "tokenizer.json").exists() or (d / "spiece.model").exists()):
        missing.append("tokenizer.json or spiece.model")
    if missing:
        raise TextEncoderError(f"tokenizer directory {d} is incomplete: missing {', '.join(missing)} "
                               f"(expected {expected}; found {sorted(p.name for p in d.iterdir())})")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(d))


def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


_jit_forward = jax.jit(_forward, static_argnums=0)


class TextEncoder:
    """Tokenizer + ``T5Encoder`` with Wan's trimming/zero-padding and an embedding cache.

    ``encode(prompts) -> [B, text_len, dim]`` in the encoder's compute dtype; row ``j >= n_b`` of
    sample ``b`` is exactly zero, where ``n_b`` is its token count including EOS.

    Cache: embeddings are kept per cleaned prompt in memory and, with ``cache_dir``, as
    ``<sha256>.npy`` files (float32, trimmed ``[n, dim]``) keyed by a hash of the prompt, ``text_len``
    and ``checkpoint_id`` (identify the weights there), written atomically.
    """

    def __init__(self, encoder: T5Encoder, tokenizer, *, text_len: int = TEXT_LEN,
                 cache_dir: str | os.PathLike | None = None, checkpoint_id: str = "",
                 tokenizer_dir: str | os.PathLike | None = None, use_cache: bool = True):
        self.encoder, self.tokenizer, self.text_len = encoder, tokenizer, text_len
        self.cfg: T5Config = encoder.cfg
        self.checkpoint_id = checkpoint_id
        self.tokenizer_dir = tokenizer_dir
        self.use_cache = use_cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._mem: dict[str, np.ndarray] = {}
        self.stats = {"hits": 0, "disk_hits": 0, "misses": 0}
        self._graphdef, self._state = nnx.split(encoder)

    # -- pieces --------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Cleaned prompts -> (ids int32 [B, text_len], mask int32 [B, text_len])."""
        out = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.text_len,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="np")
        ids = np.asarray(out["input_ids"], np.int32)
        mask = np.asarray(out["attention_mask"], np.int32)
        if ids.shape[1] != self.text_len:
            raise TextEncoderError(f"tokenizer returned length {ids.shape[1]}, expected {self.text_len}")
        if ids.size and int(ids.max()) >= self.cfg.vocab_size:
            raise TextEncoderError(f"token id {int(ids.max())} is outside the encoder vocabulary "
                                   f"({self.cfg.vocab_size}); tokenizer {self.tokenizer_dir or ''} does not "
                                   f"belong to this checkpoint")
        return ids, mask

    def _encode_uncached(self, texts: list[str]) -> list[np.ndarray]:
        ids, mask = self.tokenize(texts)
        out = _jit_forward(self._graphdef, self._state, jnp.asarray(ids), jnp.asarray(mask))
        out = np.asarray(out.astype(jnp.float32))
        lengths = mask.sum(axis=1)
        return [out[b, :int(n)] for b, n in enumerate(lengths)]

    def _key(self, text: str) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.checkpoint_id, self.text_len, text]).encode("utf-8"))
        return h.hexdigest()

    def _disk_get(self, text: str) -> np.ndarray | None:
        if self.cache_dir is None:
            return None
        p = self.cache_dir / f"{self._key(text)}.npy"
        if not p.exists():
            return None
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a damaged entry is recomputed and rewritten
        return a if a.ndim == 2 and a.shape[1] == self.cfg.dim else None

    def _disk_put(self, text: str, emb: np.ndarray) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=self.cache_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, emb.astype(np.float32), allow_pickle=False)
            os.replace(tmp, self.cache_dir / f"{self._key(text)}.npy")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- public --------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str] | str) -> jax.Array:
        """prompts (list of B strings) -> context [B, text_len, dim] (trimmed, zero-padded)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise TextEncoderError("TextEncoder.encode got an empty prompt list; pass at least one "
                                   "prompt (use [''] for an empty negative prompt)")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TextEncoderError(f"prompts must be strings, got {bad}")
        texts = [clean_prompt(p) for p in prompts]
        embs: dict[str, np.ndarray] = {}
        todo = []
        for t in dict.fromkeys(texts):
            if self.use_cache and t in self._mem:
                embs[t] = self._mem[t]
                self.stats["hits"] += 1
            elif self.use_cache and (a := self._disk_get(t)) is not None:
                embs[t] = self._mem[t] = a
                self.stats["disk_hits"] += 1
            else:
                todo.append(t)
        if todo:
            self.stats["misses"] += len(todo)
            for t, e in zip(todo, self._encode_uncached(todo)):
                embs[t] = e
                if self.use_cache:
                    self._mem[t] = e
                    self._disk_put(t, e)
        ctx = np.zeros((len(texts), self.text_len, self.cfg.dim), np.float32)
        for b, t in enumerate(texts):
            ctx[b, :embs[t].shape[0]] = embs[t]
        return jnp.asarray(ctx, dtype=self.encoder.dtype)

    __call__ = encode

    def clear_cache(self) -> None:
        """Forget the in-memory cache (the disk cache stays)."""
        self._mem.clear()


def _checkpoint_identity(ckpt_dir: Path, tokenizer_dir: Path, config: dict) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(str(ckpt_dir.resolve()).encode())
    for p in sorted((ckpt_dir / "params").glob("*")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(str(tokenizer_dir.resolve()).encode())
    return h.hexdigest()


def load_text_encoder(ckpt_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                      mesh: Mesh | None = None, dtype: Any = jnp.bfloat16, *,
                      cache_dir: str | os.PathLike | None = None, text_len: int = TEXT_LEN,
                      remat: bool = False) -> TextEncoder:
    """Load a converted T5 checkpoint (``python -m converters.t5``) and its tokenizer.

    Parameters are restored in ``dtype`` (also the compute dtype) and sharded over ``mesh``
    according to their logical axes (a single device when ``mesh`` is None).
    """
    from wanjax.checkpoint import load_model, read_config

    ckpt_dir, tokenizer_dir = Path(ckpt_dir), Path(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    raw = read_config(ckpt_dir)
    if raw.get("model") != "t5":
        raise TextEncoderError(f"{ckpt_dir}/config.json says model={raw.get('model')!r}, expected 't5'; "
                               f"convert the text encoder with python -m converters.t5")
    cfg = T5Config.from_dict(raw)

    def build(_config: dict, rngs: nnx.Rngs) -> T5Encoder:
        return T5Encoder(cfg, rngs=rngs, dtype=dtype, param_dtype=dtype, remat=remat)

    encoder = load_model(ckpt_dir, build, mesh, dtype=dtype)
    ident = _checkpoint_identity(ckpt_dir, tokenizer_dir, raw) + f":{jnp.dtype(dtype).name}"
    return TextEncoder(encoder, tokenizer, text_len=text_len, cache_dir=cache_dir, checkpoint_id=ident,
                       tokenizer_dir=tokenizer_dir)
