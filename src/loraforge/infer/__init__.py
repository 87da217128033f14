"""Inference: generation from a base model with or without an adapter."""
from loraforge.infer.generate import GenerationOptions, generate

__all__ = ["GenerationOptions", "generate"]
