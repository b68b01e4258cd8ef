"""Rebuilds the small real data subset bundled with sam_eos.

Usage (from the repository root, with the full files in a data folder laid
out as described in ``sam_eos/experiments/data.py``)::

  python sam_eos/experiments/bundled/make_bundle.py --source /path/to/data

It writes, next to this script:

- ``mnist-train-{images-idx3,labels-idx1}-ubyte.first2000.gz``: the first
  2,000 MNIST training images and labels as IDX files (gzip level 9);
- ``mnist-t10k-{images-idx3,labels-idx1}-ubyte.first1000.gz``: the first
  1,000 MNIST test images and labels;
- ``cifar10-data_batch_1.first1000.bin.xz``: the first 1,000 CIFAR-10
  training records in the official binary record format (xz, extreme);
- ``cifar10-test_batch.first1000.bin.xz``: the first 1,000 CIFAR-10 test
  records, likewise;
- ``tinyshakespeare-input.txt.gz``: the whole Tiny Shakespeare text (gzip 9).

Compression is deterministic (no timestamps or names in the gzip headers),
so rebuilding reproduces the files byte for byte with the same zlib/liblzma.
Every source file is checked against its known SHA-256 first. The script
prints each output's size and SHA-256 and says whether it matches
``data.BUNDLED_SHA256``; update that table when a file changes on purpose.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import lzma
import pathlib

import numpy as np

from sam_eos.experiments import data

_MNIST = {"images-idx3": 2051, "labels-idx1": 2049}


def _mnist_idx(
    source: pathlib.Path,
    kind: str,
    prefix: str = "train",
    count: int = data.BUNDLED_MNIST_TRAIN,
) -> bytes:
  """The first ``count`` items of one MNIST file, as IDX bytes."""
  rel = f"mnist/{prefix}-{kind}-ubyte.gz"
  items = data._read_idx(data._local(rel, source), count)
  header = np.array([_MNIST[kind], *items.shape], ">u4").tobytes()
  return header + items.tobytes()


def _cifar_records(source: pathlib.Path, split: str = "train") -> bytes:
  """The first 1,000 CIFAR-10 records of a split, from any local full copy."""
  batch = "data_batch_1" if split == "train" else "test_batch"
  count = (
      data.BUNDLED_CIFAR10_TRAIN
      if split == "train"
      else data.BUNDLED_CIFAR10_TEST
  )
  official = f"{data._CIFAR_DIR}/{batch}.bin"
  partial = data._CIFAR_PARTIAL[split][0]
  if (source / official).exists():
    records = data._read_records(data._local(official, source), count)
  else:
    records = data._read_records(data._local(partial, source), count, lzma.open)
  return records.tobytes()


def build(source: pathlib.Path, out_dir: pathlib.Path) -> dict[str, bytes]:
  """Builds the bundled files from ``source`` into ``out_dir``.

  Args:
    source: a data folder holding the full MNIST training files, a CIFAR-10
      copy with at least the first 1,000 training records and the Tiny
      Shakespeare text.
    out_dir: the folder to write to.

  Returns:
    The written contents by file name.
  """
  text = data._local("tinyshakespeare/input.txt", source).read_bytes()
  files = {
      f"mnist-train-{kind}-ubyte.first2000.gz": gzip.compress(
          _mnist_idx(source, kind), compresslevel=9, mtime=0
      )
      for kind in _MNIST
  }
  files.update(
      {
          f"mnist-t10k-{kind}-ubyte.first{data.BUNDLED_MNIST_TEST}.gz": gzip.compress(
              _mnist_idx(source, kind, "t10k", data.BUNDLED_MNIST_TEST),
              compresslevel=9,
              mtime=0,
          )
          for kind in _MNIST
      }
  )
  files["cifar10-data_batch_1.first1000.bin.xz"] = lzma.compress(
      _cifar_records(source), preset=9 | lzma.PRESET_EXTREME
  )
  files["cifar10-test_batch.first1000.bin.xz"] = lzma.compress(
      _cifar_records(source, "test"), preset=9 | lzma.PRESET_EXTREME
  )
  files["tinyshakespeare-input.txt.gz"] = gzip.compress(
      text, compresslevel=9, mtime=0
  )
  for name, content in files.items():
    (out_dir / name).write_bytes(content)
  return files


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--source",
      default=None,
      help="data folder with the full files (default: "
      f"${data.ENV_VAR} or {data.DEFAULT_DATA_DIR})",
  )
  parser.add_argument(
      "--out",
      default=str(pathlib.Path(__file__).parent),
      help="output folder (default: next to this script)",
  )
  args = parser.parse_args()
  files = build(data.resolve_data_dir(args.source), pathlib.Path(args.out))
  for name, content in files.items():
    digest = hashlib.sha256(content).hexdigest()
    same = "matches" if data.BUNDLED_SHA256[name] == digest else "DIFFERS from"
    print(
        f"{name}: {len(content):,} bytes, sha256 {digest} ({same} "
        "data.BUNDLED_SHA256)"
    )


if __name__ == "__main__":
  main()
