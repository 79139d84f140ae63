"""The same DiT forward on 8 fake CPU devices (data=2, fsdp=4) equals the 1-device forward."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import wanjax  # noqa: F401
from wanjax import sharding as shd
from wanjax.models import dit as dit_lib


def test_fsdp_forward_matches_single_device():
    assert len(jax.devices()) == 8, "conftest sets --xla_force_host_platform_device_count=8"
    cfg = dit_lib.get_config("tiny", attention="xla")
    model = dit_lib.WanDiT(cfg, rngs=nnx.Rngs(0))
    model.head.head.kernel[...] = jax.random.normal(jax.random.key(0), model.head.head.kernel.shape) * 0.1
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 6, 16)), jnp.float32)
    t = jnp.asarray([[900.0, 500.0, 100.0], [10.0, 20.0, 30.0]])
    ctx = jnp.asarray(rng.standard_normal((2, 512, 32)), jnp.float32)
    ref = model(x, t, ctx, causal=True)

    mesh = shd.make_mesh(data=2, fsdp=4)
    shd.shard_model(model, mesh)
    k = model.blocks.ffn.fc1.kernel[...]
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor") or \
        k.sharding.spec[1] == "fsdp"
    batch = shd.named_sharding(mesh, "batch", shape=(2,))
    assert batch.spec == jax.sharding.PartitionSpec("data")
    xs, ts, cs = (jax.device_put(a, batch) for a in (x, t, ctx))
    out = nnx.jit(lambda m, a, b, c: m(a, b, c, causal=True))(model, xs, ts, cs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5 * float(jnp.abs(ref).max()))


def test_attention_co_shard_pins_q_k_v_under_a_mesh():
    """cuDNN's partitioner needs q, k, v with one sharding: ``co_shard`` pins them to batch over
    (data, fsdp) and heads over tensor inside ``jax.set_mesh`` (what Trainer / TeacherPipeline use
    through ``MeshJit``), and is a no-op without a mesh."""
    from wanjax.attention import co_shard
    from wanjax.sharding import MeshJit, make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    q = jnp.ones((4, 64, 4, 8))
    kv = jnp.ones((4, 16, 4, 8))
    assert co_shard(q, kv) == (q, kv)  # no mesh context: unchanged
    fn = MeshJit(jax.jit(lambda a, b: co_shard(a, b, b)), mesh)
    outs = fn(q, kv)
    want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None))
    for o in outs:
        assert o.sharding.is_equivalent_to(want, o.ndim), o.sharding
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(q))
