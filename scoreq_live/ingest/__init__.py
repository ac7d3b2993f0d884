"""Inputs fed through the HTTP server: WebRTC (WHIP) and media-stream websockets."""
