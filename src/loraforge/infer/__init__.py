"""Inference: one session (a base plus named adapters), the decode-step engine, per-user adapter stores, routing,
predict."""
from loraforge.infer.engine import Engine, Request, SamplingParams
from loraforge.infer.generate import generate, generate_many
from loraforge.infer.router import Router, RouterData, generate_routed, train_router
from loraforge.infer.session import InferenceSession

__all__ = ["Engine", "InferenceSession", "Request", "Router", "RouterData", "SamplingParams", "generate",
           "generate_many", "generate_routed", "train_router"]
