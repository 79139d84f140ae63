"""The synthetic world of issue 7: data (``wanjax.world.data``), training losses
(``wanjax.world.losses``), the stages of ``python -m train.world`` (``wanjax.world.stages``), the
report (``wanjax.world.report``) and the bundled default model (``wanjax.world.bundle``)."""
