"""Inference: one session (a base plus named adapters), the decode-step engine, per-user adapter stores, predict."""
from loraforge.infer.engine import Engine, Request, SamplingParams
from loraforge.infer.generate import generate, generate_many
from loraforge.infer.session import InferenceSession

__all__ = ["Engine", "InferenceSession", "Request", "SamplingParams", "generate", "generate_many"]
