"""Audio I/O: PyAV encoders for every response format, reference-audio decoding, resampling."""
