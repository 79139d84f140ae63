"""Block-causal DiT: KV-cached block-by-block generation equals the full block-masked forward.

Both sides are the same float32 arithmetic on the same K/V values, differing only in summation
order inside the softmax (masked keys vs absent keys) and the per-frame cache writes, so they must
agree to ~1e-6 of the output scale; 1e-5 leaves margin for reduction-order noise.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wanjax  # noqa: F401
from wanjax import attention as attn_lib
from wanjax.models import dit as dit_lib


def _model(**kw):
    cfg = dit_lib.get_config("tiny", attention="xla", **kw)
    m = dit_lib.WanDiT(cfg, rngs=nnx.Rngs(3))
    # the head is zero-initialised (as in Wan); give it weights so outputs are informative
    m.head.head.kernel[...] = jax.random.normal(jax.random.key(1), m.head.head.kernel.shape) * 0.1
    return m


def _data(F, seed=0, B=1, H=4, W=6):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, F, H, W, 16)), jnp.float32)
    ctx = np.zeros((B, 512, 32), np.float32)
    ctx[:, :5] = rng.standard_normal((B, 5, 32))
    t = jnp.asarray(rng.uniform(0, 1000, (B, F)), jnp.float32)
    return x, t, jnp.asarray(ctx)


def _run_cached(model, x, t, ckv, nfb):
    F = x.shape[1]
    T = (x.shape[2] // 2) * (x.shape[3] // 2)
    cache = model.init_cache(x.shape[0], T)
    step = nnx.jit(lambda m, xb, tb, c, s: m.forward_cached(xb, tb, ckv, c, s))
    outs = []
    for s in range(0, F, nfb):
        out, cache = step(model, x[:, s:s + nfb], t[:, s:s + nfb], cache, s)
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


def test_cached_blocks_equal_block_masked_forward():
    model = _model(max_frames=9)
    x, t, ctx = _data(9)
    ckv = model.context_kv(ctx)
    full = model(x, t, ckv=ckv, causal=True)
    cached = _run_cached(model, x, t, ckv, 3)
    scale = float(jnp.abs(full).max())
    assert scale > 0.1
    assert float(jnp.abs(full - cached).max()) <= 1e-5 * scale
    # and causality is real: the first block does not depend on later frames
    x2 = x.at[:, 6:].add(1.0)
    full2 = model(x2, t, ckv=ckv, causal=True)
    np.testing.assert_allclose(np.asarray(full2[:, :6]), np.asarray(full[:, :6]), atol=1e-6 * scale)
    assert float(jnp.abs(full2[:, 6:] - full[:, 6:]).max()) > 1e-3
    # bidirectional differs from causal for the early blocks
    bi = model(x, t, ckv=ckv, causal=False)
    assert float(jnp.abs(bi[:, :3] - full[:, :3]).max()) > 1e-3


def test_denoising_steps_and_context_pass_share_a_slot():
    """Re-running a block at the same start frame overwrites its K/V: after noisy steps and a
    clean context pass, the next block sees exactly what the masked forward sees for clean inputs."""
    model = _model(max_frames=6)
    x, t, ctx = _data(6, seed=1)
    ckv = model.context_kv(ctx)
    T = 2 * 3
    cache = model.init_cache(1, T)
    noisy = x[:, :3] + 0.7
    _, cache = model.forward_cached(noisy, jnp.full((1, 3), 900.0), ckv, cache, 0)
    _, cache = model.forward_cached(noisy * 0.5, jnp.full((1, 3), 600.0), ckv, cache, 0)
    _, cache = model.forward_cached(x[:, :3], jnp.zeros((1, 3)), ckv, cache, 0)   # context pass
    out, _ = model.forward_cached(x[:, 3:], t[:, 3:], ckv, cache, 3)
    t_full = jnp.concatenate([jnp.zeros((1, 3)), t[:, 3:]], axis=1)
    full = model(x, t_full, ckv=ckv, causal=True)
    scale = float(jnp.abs(full).max())
    assert float(jnp.abs(full[:, 3:] - out).max()) <= 1e-5 * scale


@pytest.mark.parametrize("window,sink", [(6, 0), (7, 1)])
def test_rolling_cache_equals_explicit_window_mask(window, sink):
    model = _model(local_attn_size=window, sink_size=sink)
    F = 15
    x, t, ctx = _data(F, seed=2)
    ckv = model.context_kv(ctx)
    cached = _run_cached(model, x, t, ckv, 3)
    full = model(x, t, ckv=ckv, causal=True)  # causal=True uses the window/sink mask of the config
    spec = model.attention_spec((F, 2, 3), True)
    assert spec.window_frames == window and spec.sink_frames == sink
    scale = float(jnp.abs(full).max())
    assert float(jnp.abs(full - cached).max()) <= 1e-5 * scale
    # the window really drops frames: the last block differs from unwindowed attention
    unwindowed = dit_lib.WanDiT(model.cfg.replace(local_attn_size=-1, max_frames=F), rngs=nnx.Rngs(0))
    nnx.update(unwindowed, nnx.state(model))
    ref = unwindowed(x, t, ckv=ckv, causal=True)
    assert float(jnp.abs(ref[:, -3:] - full[:, -3:]).max()) > 1e-4


def test_frame_mask_semantics():
    spec = attn_lib.BlockCausalSpec(1, 3, window_frames=7, sink_frames=1)
    m = spec.frame_mask(12)
    # query in block 3 (frames 9..11, end 12): sink frame 0 and the most recent 6 frames 6..11
    np.testing.assert_array_equal(np.nonzero(m[10])[0], [0, 6, 7, 8, 9, 10, 11])
    # query in block 0: frames 0..2 only
    np.testing.assert_array_equal(np.nonzero(m[1])[0], [0, 1, 2])


def test_cached_step_compiles_once_and_runs_past_1024_frames():
    model = _model(local_attn_size=6, sink_size=0)
    x, t, ctx = _data(3, seed=4)
    ckv = model.context_kv(ctx)
    cache = model.init_cache(1, 6)
    traces = []

    @nnx.jit
    def step(m, xb, tb, c, s):
        traces.append(1)
        return m.forward_cached(xb, tb, ckv, c, s)

    for s in (0, 3, 6, 9, 1500, 3000):
        out, cache = step(model, x, t, cache, s)
        assert bool(jnp.isfinite(out).all())
    assert len(traces) == 1


def test_splash_interpret_matches_reference():
    rng = np.random.default_rng(0)
    B, F, T, H, D = 1, 6, 24, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((B, F * T, H, D)), jnp.float32) for _ in range(3))
    spec = attn_lib.BlockCausalSpec(T, 3)
    ref = attn_lib.block_causal_attention(q, k, v, spec, backend="xla")
    out = attn_lib.block_causal_attention(q, k, v, spec, backend="splash")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_per_block_path_matches_dense_mask():
    """The cuDNN strategy (one unmasked call per block against its key range) on the XLA kernel."""
    rng = np.random.default_rng(1)
    B, F, T, H, D = 1, 9, 8, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((B, F * T, H, D)), jnp.float32) for _ in range(3))
    for spec in (attn_lib.BlockCausalSpec(T, 3), attn_lib.BlockCausalSpec(T, 3, window_frames=5, sink_frames=1)):
        ref = attn_lib.block_causal_attention(q, k, v, spec, backend="xla")
        per = attn_lib._per_block(q, k, v, spec, F, lambda a, b, c: attn_lib.xla_attention(a, b, c))
        np.testing.assert_allclose(np.asarray(per), np.asarray(ref), atol=1e-5)


def test_per_block_whole_prefix_form_matches_dense_mask_with_gradients():
    """The form the cuDNN backend runs: K/V padded once (72 -> 128 keys, as cuDNN's 64-multiple
    padding), every prefix block attending the whole padded K/V with ``kv_len`` instead of a sliced
    copy, windowed blocks that start later still sliced. Output and q/k/v gradients against the
    dense-mask reference in float32; 1e-5 is float32 softmax/matmul rounding (the same arithmetic in
    another order), while a padded key let in, or a block's keys cut short, moves them by O(0.1)."""
    rng = np.random.default_rng(2)
    B, F, T, H, D = 1, 9, 8, 2, 16
    q, k, v, g = (jnp.asarray(rng.standard_normal((B, F * T, H, D)), jnp.float32) for _ in range(4))
    calls = []

    def xla_fn(a, b, c, kv_len=None):
        calls.append((b.shape[1], kv_len))
        return attn_lib.xla_attention(a, b, c, kv_len=kv_len)

    for spec in (attn_lib.BlockCausalSpec(T, 3), attn_lib.BlockCausalSpec(T, 3, window_frames=5, sink_frames=1),
                 attn_lib.BlockCausalSpec(T, 3, window_frames=4)):
        calls.clear()

        def loss(fn, q, k, v):
            return jnp.sum(fn(q, k, v) * g)

        ref_fn = lambda q, k, v: attn_lib.block_causal_attention(q, k, v, spec, backend="xla")  # noqa: E731
        per_fn = lambda q, k, v: attn_lib._per_block(q, k, v, spec, F, xla_fn, pad_multiple=64)  # noqa: E731
        ref, ref_g = ref_fn(q, k, v), jax.grad(functools.partial(loss, ref_fn), argnums=(0, 1, 2))(q, k, v)
        per, per_g = per_fn(q, k, v), jax.grad(functools.partial(loss, per_fn), argnums=(0, 1, 2))(q, k, v)
        np.testing.assert_allclose(np.asarray(per), np.asarray(ref), atol=1e-5)
        for a, b in zip(per_g, ref_g):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        if spec.window_frames is None:  # every block: the whole padded K/V, its prefix as kv_len
            assert calls[:3] == [(128, 24), (128, 48), (128, 72)]
        else:  # the first block's range is a prefix; later ones start past frame 0 and are sliced
            assert calls[0] == (128, 24) and all(kv is None for _, kv in calls[1:3])


def test_split_form_matches_dense_mask_with_gradients():
    """The form the cuDNN backend runs for unwindowed specs: token-causal attention plus each block's
    strict upper triangle (time-reversed), merged through their log-sum-exps, with a backward that
    runs each part's flash backward from the *merged* output and log-sum-exp. On the XLA kernel pair,
    in float32, against the dense block-causal mask: output and q/k/v gradients within 1e-5 (float32
    rounding of the same sums in another order). A wrong merge weight, a token in the wrong part, a
    missing or doubled diagonal, or a partial backward using its own statistics moves them by O(0.1).
    Batch 2, blocks of one and three frames, without padding and with padding to a multiple (the
    padded keys must stay invisible to real queries in both parts)."""
    rng = np.random.default_rng(3)
    B, F, T, H, D = 2, 6, 5, 2, 8
    q, k, v, g = (jnp.asarray(rng.standard_normal((B, F * T, H, D)), jnp.float32) for _ in range(4))
    for fpb, multiple in ((3, 1), (3, 8), (1, 4), (6, 16)):
        spec = attn_lib.BlockCausalSpec(T, fpb)
        ref_fn = lambda q, k, v: attn_lib.block_causal_attention(q, k, v, spec, backend="xla")  # noqa: E731
        split_fn = lambda q, k, v: attn_lib.block_causal_split(q, k, v, F // fpb, backend="xla",  # noqa: E731
                                                               multiple=multiple)
        ref, ref_vjp = jax.vjp(ref_fn, q, k, v)
        out, out_vjp = jax.vjp(split_fn, q, k, v)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
        for a, b in zip(out_vjp(g), ref_vjp(g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    with pytest.raises(ValueError, match="equal blocks"):
        attn_lib.block_causal_split(q, k, v, 4)


def test_split_form_residuals_are_kept_by_the_attention_policies():
    """Under a remat policy that keeps attention (``attention``, ``attention_proj``, ``dots``) the
    split form's merged output and log-sum-exp are saved, so its kernels do not run again in the
    backward; under ``full`` nothing is saved. Checked through the residuals JAX reports."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((1, 24, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 48)), jnp.float32) * 0.3

    def layer(x, w):
        qkv = jnp.tanh(x @ w).reshape(1, 24, 3, 2, 8)
        o = attn_lib.block_causal_split(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], 3, backend="xla")
        return jnp.sum(jnp.sin(o))

    for policy, kept in (("full", False), ("attention", True), ("attention_proj", True), ("dots", True)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print_saved_residuals(jax.checkpoint(layer, policy=dit_lib.remat_policy(policy, "cudnn")), x, w)
        named = buf.getvalue().count(f"named '{attn_lib.SPLIT_RESIDUAL_NAME}'")
        assert named == (2 if kept else 0), (policy, buf.getvalue())
        g = jax.grad(jax.checkpoint(layer, policy=dit_lib.remat_policy(policy, "cudnn")), argnums=1)(x, w)
        np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(layer, argnums=1)(x, w)), rtol=1e-5, atol=1e-6)


def test_cudnn_backward_binding_matches_the_installed_jax():
    """``_cudnn_causal_bwd`` binds jax's private cuDNN backward primitive by hand. Abstract evaluation
    and lowering for CUDA need no GPU, so a jax whose primitive takes other operands or keywords
    fails here, on the CPU, instead of on the first GPU run (a missing keyword fails the lowering):
    dq, dk, dv must have q's, k's and v's shapes and dtypes, and the lowered module must hold cuDNN's
    fused-attention backward call."""
    B, L, H, D = 2, 128, 4, 64
    x = jax.ShapeDtypeStruct((B, L, H, D), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((B, H, L), jnp.float32)
    fn = jax.jit(lambda q, k, v, o, s, do: attn_lib._cudnn_causal_bwd(q, k, v, o, s, do, D ** -0.5))
    out = jax.eval_shape(fn, x, x, x, x, lse, x)
    assert [(a.shape, a.dtype) for a in out] == [((B, L, H, D), jnp.bfloat16)] * 3
    text = fn.trace(x, x, x, x, lse, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "fmhaSoftmaxBackward" in text, text[:2000]


def test_cudnn_wrapper_padding_and_query_chunks_on_the_reference_kernel(monkeypatch):
    """``_cudnn``'s own logic (K/V padded to 64 and masked with ``key_value_seq_lengths``, queries
    unpadded, short key sets run as a batch of query chunks with K/V broadcast through float32), run
    on the CPU by standing the XLA reference in for cuDNN. Output and q/k/v gradients against plain
    attention in float32 within 1e-5 (the same sums in another order); a chunk seeing the wrong keys,
    a padded key let in, or a lost chunk gradient moves them by O(0.1)."""
    def fake_cudnn(q, k, v, *, scale=None, implementation=None, key_value_seq_lengths=None, **kw):
        assert implementation == "cudnn" and not kw
        assert k.shape[1] % attn_lib.CUDNN_SEQ_MULTIPLE == 0
        return attn_lib.xla_attention(q, k, v, kv_len=key_value_seq_lengths, scale=scale)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
    assert attn_lib.query_chunks(32760, 512) == 15 and attn_lib.query_chunks(32760, 32760) == 1
    assert attn_lib.query_chunks(4680, 512) == 2 and attn_lib.query_chunks(600, 40) == 1
    rng = np.random.default_rng(5)
    for B, Lq, Lk, kv_len, n in ((2, 4096 * 3, 100, None, 6), (1, 96, 72, 40, 1), (2, 60, 64, None, 1)):
        assert attn_lib.query_chunks(Lq, Lk) == n
        q, g = (jnp.asarray(rng.standard_normal((B, Lq, 2, 8)), jnp.float32) for _ in range(2))
        k, v = (jnp.asarray(rng.standard_normal((B, Lk, 2, 8)), jnp.float32) for _ in range(2))
        ref_fn = lambda q, k, v: attn_lib.xla_attention(q, k, v, kv_len=kv_len)  # noqa: E731
        fn = lambda q, k, v: attn_lib._cudnn(q, k, v, kv_len)  # noqa: E731
        ref, ref_vjp = jax.vjp(ref_fn, q, k, v)
        out, out_vjp = jax.vjp(fn, q, k, v)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
        for a, b in zip(out_vjp(g), ref_vjp(g)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_remat_policies_keep_the_gradients():
    """Every ``remat_policy`` only changes what the backward pass keeps versus recomputes: loss and
    parameter gradients equal the un-rematerialised ones (full-sequence block-causal forward and the
    KV-cached step). The policies that save named values must actually save them (checked through
    the residuals JAX reports), else they would silently be "full"."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    x, t, ctx = _data(6)

    def grads(policy, remat=True, cached=False, **kw):
        m = _model(max_frames=6, remat=remat, remat_policy=policy, **kw)
        gd, st = nnx.split(m)

        def loss(s):
            mm = nnx.merge(gd, s)
            ckv = mm.context_kv(ctx)
            if cached:
                out, _ = mm.forward_cached(x[:, :3], t[:, :3], ckv, mm.init_cache(1, 6), 0)
            else:
                out = mm(x, t, ckv=ckv, causal=True)
            return jnp.mean(out ** 2)

        return loss, st, jax.value_and_grad(loss)(st)

    saved = {}
    # (policy, remat_dots_layers): the tiny model has 2 blocks, so 1 splits the layer scan in two
    # (only the full-sequence forward has remat_dots_layers)
    variants = [(p, 0) for p in dit_lib.REMAT_POLICIES]
    for cached in (False, True):
        _, _, (l0, g0) = grads("full", remat=False, cached=cached)
        for policy, n_dots in variants + ([] if cached else [("attention", 1), ("full", 2)]):
            loss, st, (l1, g1) = grads(policy, cached=cached, remat_dots_layers=n_dots)
            # float32 throughout: recomputation replays the same ops, so equal up to XLA fusion order
            assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
            for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
            if not cached:
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    print_saved_residuals(loss, st)
                # per-layer values the layer scan keeps for the backward pass (stacked over layers)
                saved[policy if not n_dots else f"{policy}+dots{n_dots}"] = sum(
                    "output of scan" in line and "scan_layers" in line for line in buf.getvalue().splitlines())
    # full keeps the block inputs only; attention adds the attention output, attention_proj also
    # q/k/v and the projections; dots keeps every matmul output
    assert saved["full"] == 1 and saved["attention"] == 2, saved
    assert saved["attention_proj"] > saved["attention"] and saved["dots"] > saved["attention"], saved
    # remat_dots_layers: the first blocks' scan keeps what "dots" keeps, the rest what its policy keeps
    assert saved["attention+dots1"] == saved["dots"] + saved["attention"], saved
    assert saved["full+dots2"] == saved["dots"], saved
    with pytest.raises(ValueError, match="remat_policy"):
        dit_lib.remat_policy("everything")
    with pytest.raises(ValueError, match="remat_dots_layers=-1"):
        dit_lib.scan_layers(lambda c, x: (c, None), 0.0, jnp.zeros(2), _model(remat=True, remat_dots_layers=-1).cfg)


@pytest.mark.parametrize("policy,n_dots", [("attention", 2), ("full", 0), ("dots", 0)])
def test_unrolled_layer_scans_equal_the_rolled_ones(policy, n_dots):
    """``unroll_layers`` changes only how XLA sees the layer loop (straight-line code instead of a
    while loop with stacked residuals): loss and gradients equal the rolled scan's, the unrolled
    program has no loop left, and each rematerialised block is fenced (prevent_cse) so that XLA
    cannot merge its recomputation into the forward and defeat the remat."""
    x, t, ctx = _data(6, seed=5)

    def loss_and_grads(unroll):
        # 4 blocks: with remat_dots_layers=2 both layer scans have 2 steps (a 1-step scan is a loop either way)
        m = _model(max_frames=6, num_layers=4, remat=True, remat_policy=policy, remat_dots_layers=n_dots,
                   unroll_layers=unroll)
        gd, st = nnx.split(m)

        def loss(s):
            mm = nnx.merge(gd, s)
            return jnp.mean(mm(x, t, ckv=mm.context_kv(ctx), causal=True) ** 2)

        f = jax.jit(jax.value_and_grad(loss))
        return f(st), f.lower(st).as_text(), str(jax.make_jaxpr(loss)(st))

    (l0, g0), hlo0, jaxpr0 = loss_and_grads(False)
    (l1, g1), hlo1, jaxpr1 = loss_and_grads(True)
    # float32, same ops in the same order per block: equal up to XLA's fusion choices
    assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    # the rolled program loops over the layers in each layer scan, forward and backward (two scans with
    # remat_dots_layers); the unrolled one does not. (context_kv's own scan stays a loop in both.)
    scans = 2 if n_dots else 1
    assert hlo0.count("stablehlo.while") - hlo1.count("stablehlo.while") == 2 * scans
    # the blocks' checkpoints are fenced only when unrolled (the lowered barriers cannot tell them
    # from the FFN backward's own, so this reads the checkpoint parameters)
    assert "prevent_cse=True" in jaxpr1 and "prevent_cse=True" not in jaxpr0


def test_bf16_residual_stream_cached_full_and_gradients():
    """``residual_dtype="bfloat16"`` (the stream stored in bf16, adds in fp32): the tokens the layer
    scan carries are bf16; the KV-cached blocks still equal the block-masked forward; and the
    gradients stay those of the float32 stream up to its rounding. Tolerances: cached vs full do the
    same fp32 ops, but a ~1e-7 difference before a bf16 rounding can flip one element by one bf16 ulp
    (2^-8 relative), which moves the output by up to ~1e-3 of its scale, so 2e-3 (measured: 5e-7).
    Gradients: the 7 roundings of the stream (the embedding, then 3 adds per block x 2 blocks) each
    contribute <= 2^-9 relative error, ~3e-3 in quadrature; 1.5e-2 leaves room for amplification
    through the backward (measured: 4e-3). Remat replays identical bf16 roundings,
    so the policies must still agree exactly."""
    x, t, ctx = _data(9)
    m = _model(max_frames=9, residual_dtype="bfloat16")
    assert m.embed_tokens(x)[0].dtype == jnp.bfloat16
    ckv = m.context_kv(ctx)
    full = m(x, t, ckv=ckv, causal=True)
    assert full.dtype == jnp.float32
    cached = _run_cached(m, x, t, ckv, 3)
    scale = float(jnp.abs(full).max())
    assert float(jnp.abs(full - cached).max()) <= 2e-3 * scale
    ref = _model(max_frames=9)(x, t, ckv=ckv, causal=True)
    assert float(jnp.abs(full - ref).max()) > 1e-5 * scale   # the rounding is really there

    x, t, ctx = _data(6)

    def grads(residual, policy):
        mm = _model(max_frames=6, remat=True, remat_policy=policy, residual_dtype=residual)
        gd, st = nnx.split(mm)

        def loss(s):
            mo = nnx.merge(gd, s)
            return jnp.mean(mo(x, t, ckv=mo.context_kv(ctx), causal=True) ** 2)

        lval, g = jax.value_and_grad(loss)(st)
        return float(lval), np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(g)])

    l32, g32 = grads("float32", "attention")
    l16, g16 = grads("bfloat16", "attention")
    l16f, g16f = grads("bfloat16", "full")
    assert np.isfinite(g16).all()
    assert 1e-5 < np.linalg.norm(g16 - g32) / np.linalg.norm(g32) <= 1.5e-2
    assert abs(l16 - l32) <= 1e-2 * abs(l32)
    assert l16f == l16
    np.testing.assert_allclose(g16f, g16, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"residual_dtype='float16'.*choose one of"):
        _model(residual_dtype="float16")
