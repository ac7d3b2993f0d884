"""scoreq-live: a realtime speech-quality monitor.

Audio from sound devices, files, RTP streams (an .sdp file, a pcap
capture replayed) and publishers (WebRTC over WHIP, media-stream
websockets) is cut into sliding windows, scored by an ONNX model (MOS, or
distance to a clean reference embedding) here or on a Triton server,
smoothed, and published as versioned JSON events that every output renders.
"""

__version__ = "0.1.0"
