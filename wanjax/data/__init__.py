"""Data: the procedural synthetic pose-driven video world (``wanjax.data.synthetic``)."""
