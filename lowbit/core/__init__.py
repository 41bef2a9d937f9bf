"""The post-training flow on top of the passes: calibration streams, ``quantize``, the quantized
module it returns, and ``save`` / ``load`` (with the staged output folders they write into)."""
