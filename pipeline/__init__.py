"""mmpipe: batch, stream and online inference for multimodal fusion models."""

__version__ = "0.1.0"
