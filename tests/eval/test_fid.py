import importlib.util
import pickle
import zipfile

import numpy as np
import pytest
import scipy.linalg

from helpers import REPO
from jaxgen.convert.torch_pickle import load_torch_state_dict
from jaxgen.errors import CheckpointError
from jaxgen.eval import fid


def _reference_module():
  spec = importlib.util.spec_from_file_location("make_fid_reference",
                                                REPO / "scripts" / "make_fid_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_frechet_distance_matches_the_scipy_formula():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(400, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
  mu1, s1 = fid.feature_stats(a)
  mu2, s2 = fid.feature_stats(b)
  ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
  assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
  assert fid.frechet_distance(mu1, s1, mu1 + 2.0, s1) == pytest.approx(4.0 * 6, rel=1e-6)


def test_precision_recall_against_brute_force_and_by_relations():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(200, 4))
  fake = rng.normal(size=(150, 4)) + np.array([1.5, 0, 0, 0])

  def brute(r, f, k=3):
    rr = np.sort(((r[:, None] - r[None]) ** 2).sum(-1), 1)[:, k]
    fr = np.sort(((f[:, None] - f[None]) ** 2).sum(-1), 1)[:, k]
    d = ((f[:, None] - r[None]) ** 2).sum(-1)
    return (d <= rr[None]).any(1).mean(), (d.T <= fr[None]).any(1).mean()

  assert fid.precision_recall(real, fake) == pytest.approx(brute(real, fake), abs=1e-9)
  assert fid.precision_recall(real, real) == (1.0, 1.0)
  p, r = fid.precision_recall(real, real + 100.0)
  assert p == 0.0 and r == 0.0
  # A generator that covers one corner of the data: precise, but low recall.
  corner = real[real[:, 0] > 1.0][:, None, :] + 0.01 * rng.normal(size=(1, 5, 4))
  p, r = fid.precision_recall(real, corner.reshape(-1, 4))
  assert p > 0.9 and r < 0.3


def test_density_and_coverage_against_brute_force():
  rng = np.random.default_rng(2)
  real, fake = rng.normal(size=(120, 3)), rng.normal(size=(80, 3)) * 1.5
  d = ((fake[:, None] - real[None]) ** 2).sum(-1)
  radii = np.sort(((real[:, None] - real[None]) ** 2).sum(-1), 1)[:, 5]
  inside = d <= radii[None]
  ref = (inside.sum() / (5 * len(fake)), inside.any(0).mean())
  assert fid.density_coverage(real, fake, 5) == pytest.approx(ref)
  # an outlier far from the data gets neither density nor coverage
  assert fid.density_coverage(real, real[:1] + 50.0, 5) == (0.0, 0.0)


def test_torch_state_dicts_load_without_torch_in_both_formats(tmp_path):
  torch = pytest.importorskip("torch")
  sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.float64)[1:],
        "t": torch.ones(2, 3).t(), "n": torch.tensor(7), "h": torch.randn(2).half()}
  for legacy in (False, True):
    path = tmp_path / f"w{legacy}.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    out = load_torch_state_dict(path)
    for k, v in sd.items():
      np.testing.assert_array_equal(out[k], v.numpy())
      assert out[k].dtype == v.numpy().dtype


def test_a_pickle_that_runs_code_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      import os
      return (os.system, ("echo pwned",))

  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}))
  with pytest.raises(CheckpointError, match="refusing to load"):
    load_torch_state_dict(path)
  with pytest.raises(CheckpointError, match="not found"):
    load_torch_state_dict(tmp_path / "missing.pth")


def test_fid_inception_matches_pytorch_fid(tmp_path):
  """Features equal pytorch-fid's for the same (synthetic, deterministic) weights: the stored
  reference comes from scripts/make_fid_reference.py run against pytorch-fid."""
  ref = np.load(REPO / "tests" / "fixtures" / "fid_inception_reference.npz")
  weights = _reference_module().synthetic_weights(list(ref["names"]), ref["shapes"])
  torch = pytest.importorskip("torch")
  path = tmp_path / "pt_inception-synthetic.pth"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, path)
  net = fid.InceptionFeatures.from_file(path)
  features = np.asarray(net(ref["images"]))
  scale = np.abs(ref["features"]).max()
  np.testing.assert_allclose(features, ref["features"], atol=1e-4 * scale)
  # grey images go in as three equal channels; uint8 is scaled to [0, 1]
  grey = (ref["images"][:2, ..., :1] * 255).astype(np.uint8)
  assert net(grey).shape == (2, 2048)


def test_inception_weights_with_a_wrong_tensor_are_refused(tmp_path):
  torch = pytest.importorskip("torch")
  ref = np.load(REPO / "tests" / "fixtures" / "fid_inception_reference.npz")
  weights = _reference_module().synthetic_weights(list(ref["names"]), ref["shapes"])
  weights["Mixed_5b.branch1x1.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  path = tmp_path / "bad.pth"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, path)
  with pytest.raises(CheckpointError, match="Mixed_5b.branch1x1.conv.weight has shape"):
    fid.InceptionFeatures.from_file(path)
