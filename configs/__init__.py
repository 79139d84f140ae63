"""ml-collections configs (``configs/infer.py:NAME``)."""
