"""RTP call legs without I/O: packets, codecs, jitter buffering and network statistics.

Nothing here opens a socket or reads a clock: bytes and arrival times are passed
in, decoded 16 kHz audio and per-window network numbers come out.
"""
