"""Model loading, forward passes on the batch layout, and the tiny-model factory."""
