"""Builds jaxgen/data/embedded/fashion_mnist_small.npz from Debian's `dataset-fashion-mnist`.

Run once by a maintainer (`apt-get install dataset-fashion-mnist`); the result ships in the
package so that the default data set needs no download. Class-balanced, deterministic subset.
"""
import argparse
import gzip
import pathlib

import numpy as np

SRC = pathlib.Path("/usr/share/datasets/fashion-mnist")
OUT = pathlib.Path(__file__).resolve().parents[1] / "jaxgen/data/embedded/fashion_mnist_small.npz"


def read_idx(path: pathlib.Path) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_subset(images, labels, per_class, seed):
  rng = np.random.default_rng(seed)
  idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                        for c in range(10)])
  idx = rng.permutation(idx)
  return images[idx], labels[idx]


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--train_per_class", type=int, default=600)
  p.add_argument("--test_per_class", type=int, default=100)
  a = p.parse_args()
  tr_x, tr_y = balanced_subset(read_idx(SRC / "train-images-idx3-ubyte.gz"),
                               read_idx(SRC / "train-labels-idx1-ubyte.gz"), a.train_per_class, 0)
  te_x, te_y = balanced_subset(read_idx(SRC / "t10k-images-idx3-ubyte.gz"),
                               read_idx(SRC / "t10k-labels-idx1-ubyte.gz"), a.test_per_class, 1)
  np.savez_compressed(OUT, train_images=tr_x[..., None], train_labels=tr_y.astype(np.uint8),
                      test_images=te_x[..., None], test_labels=te_y.astype(np.uint8))
  print(OUT, OUT.stat().st_size, tr_x.shape, te_x.shape)


if __name__ == "__main__":
  main()
