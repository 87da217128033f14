"""Serving: an OpenAI-compatible HTTP server over the decode engine, one adapter per request (`loraforge serve`)."""
from loraforge.serve.app import create_app

__all__ = ["create_app"]
