"""Outputs: each reads the event bus and renders the same events its own way."""
