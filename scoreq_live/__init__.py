"""scoreq-live: a realtime speech-quality monitor.

Audio from sound devices, files and (later) network streams is cut into
sliding windows, scored by an ONNX model (MOS, or distance to a clean
reference embedding), smoothed, and published as versioned JSON events that
every output renders.
"""

__version__ = "0.1.0"
