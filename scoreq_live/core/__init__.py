"""Pure logic: no asyncio, no sockets, no clocks. Time is passed in."""

SAMPLE_RATE = 16_000
"""Every stream is normalised to 16 kHz mono float32 before it reaches the core."""
