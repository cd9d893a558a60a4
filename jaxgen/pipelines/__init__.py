"""User-facing jitted functions: encode/decode, sampling, interpolation, text to image."""
