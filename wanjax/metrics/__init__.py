"""Metrics: pose following (``wanjax.metrics.pose``) and video quality / temporal
consistency (``wanjax.metrics.video``)."""
