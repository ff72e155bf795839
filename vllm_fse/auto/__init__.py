"""``VLLM_FSE=auto``: the per-model switch point between the fused and the split path, its
calibration on the live layer and its on-disk cache (see docs/design.md)."""
