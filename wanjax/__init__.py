"""wanjax: pose-controlled streaming video generation (Wan2.1, UniAnimate-DiT, Self-Forcing) in JAX."""
import flax as _flax

# Parameters carry *logical* axis names in their `out_sharding` metadata. They are mapped to a mesh
# explicitly by `wanjax.sharding`, so Flax must not try to shard them eagerly at creation time.
_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
