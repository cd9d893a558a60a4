"""Denoising held-out pictures with added Gaussian noise: PSNR and SSIM of the noisy input, of a
Gaussian blur tuned per sigma (the best of a sweep, chosen on the same images: an optimistic
baseline), of scikit-image's wavelet (BayesShrink) and total-variation (Chambolle, weight tuned
per sigma the same way) denoisers, and of jaxgen's denoiser (DDIM from the matched step, and the
mean of --draws ancestral draws), with the noise level given and estimated.

python benchmarks/denoise.py --workdir runs/ddpm_class [--num 200] [--draws 8]
Writes benchmarks/results/denoise.{json,md}. Needs scikit-image and PyWavelets (the test extra).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import numpy as np

from jaxgen import app, runtime
from jaxgen.data import load_all, load_source
from jaxgen.eval.image_metrics import psnr, ssim
from jaxgen.images import to_unit
from jaxgen.pipelines import diffusion as pipe

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SIGMAS = (0.05, 0.1, 0.2, 0.4)


def scores(clean, x) -> dict:
  x = np.clip(np.asarray(x, np.float32), 0, 1)
  return {"psnr": float(np.mean(psnr(clean, x))), "ssim": float(np.mean(ssim(clean, x)))}


def best_of(clean, noisy, fn, params) -> tuple[dict, float]:
  """The parameter of `fn` with the highest mean PSNR (tuned on these images)."""
  best = None
  for p in params:
    s = scores(clean, np.stack([fn(im, p) for im in noisy]))
    if best is None or s["psnr"] > best[0]["psnr"]:
      best = (s, p)
  return best


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="a trained ddpm run")
  ap.add_argument("--num", type=int, default=200, help="held-out pictures")
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--draws", type=int, default=8)
  ap.add_argument("--out", default=str(RESULTS / "denoise"))
  args = ap.parse_args()
  runtime.enable_compilation_cache()
  from scipy.ndimage import gaussian_filter
  from skimage.restoration import denoise_tv_chambolle, denoise_wavelet

  run = app.restore_run(args.workdir, with_state=False)
  data = load_all(load_source(run.config.data, run.config.data.eval_split), limit=args.num)
  clean = np.asarray(to_unit(data["image"]), np.float32)
  rng = np.random.default_rng(0)
  channel_axis = -1
  rows = []
  for sigma in SIGMAS:
    noisy = (clean + sigma * rng.normal(size=clean.shape)).astype(np.float32)
    row = {"sigma": sigma, "noisy": scores(clean, noisy)}
    row["gaussian_blur"], row["blur_width"] = best_of(
        clean, noisy, lambda im, w: gaussian_filter(im, (w, w, 0)),
        (0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8))
    row["wavelet"] = scores(clean, np.stack([
        denoise_wavelet(im, method="BayesShrink", mode="soft", rescale_sigma=True,
                        channel_axis=channel_axis) for im in noisy]))
    row["tv"], row["tv_weight"] = best_of(
        clean, noisy, lambda im, w: denoise_tv_chambolle(im, weight=w, channel_axis=channel_axis),
        (0.02, 0.05, 0.1, 0.2, 0.4))
    for name, given, draws in (("jaxgen_ddim", True, 1), ("jaxgen_ddim_est", False, 1),
                               (f"jaxgen_mean{args.draws}", True, args.draws)):
      t0 = time.perf_counter()
      out, sig = pipe.denoise(run.task.model, run.params, noisy, jax.random.PRNGKey(1),
                              sigma=sigma if given else None, steps=args.steps, draws=draws)
      row[name] = dict(scores(clean, out), seconds=time.perf_counter() - t0)
      if not given:
        row["estimated_sigma_mean"] = float(np.mean(sig))
    rows.append(row)
    print(json.dumps(row))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = dict(workdir=args.workdir, num=len(clean), steps=args.steps, draws=args.draws,
              device=jax.devices()[0].device_kind)
  out.with_suffix(".json").write_text(json.dumps(dict(meta, rows=rows), indent=2) + "\n")
  methods = [k for k in rows[0] if isinstance(rows[0][k], dict)]
  lines = ["| sigma | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
  for r in rows:
    lines.append(f"| {r['sigma']} | " + " | ".join(
        f"{r[m]['psnr']:.2f} / {r[m]['ssim']:.3f}" for m in methods) + " |")
  out.with_suffix(".md").write_text(
      f"PSNR (dB) / SSIM on {len(clean)} held-out pictures of {args.workdir}; command: "
      f"python benchmarks/denoise.py --workdir {args.workdir} --num {args.num}\n\n"
      + "\n".join(lines) + "\n")
  print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
  main()
