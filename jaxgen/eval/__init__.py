"""Metrics: image fidelity (PSNR, SSIM), distribution distances, zero-shot and probes."""
