"""What a quantized model costs and how each layer fared: accounting (FLOPs, BOPs, size) and the
per-layer report."""
