"""flax.linen modules only: layers, autoencoders, U-Nets, encoders. No training plumbing here."""
