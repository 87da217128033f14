"""Serving: an OpenAI-compatible HTTP server over the decode engine, one adapter per request (`loraforge serve`)."""
from loraforge.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
