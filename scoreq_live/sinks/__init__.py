"""Outputs: each reads the event bus and renders the same events its own way."""

from scoreq_live.sinks.base import Sink

__all__ = ["Sink"]
