"""The data sets of the paper's experiments: MNIST, CIFAR-10, Tiny Shakespeare.

Loaders return NumPy arrays read from the canonical files, which live in a
data folder (``data_dir`` argument, else ``$SAM_EOS_DATA``, else
``~/.cache/sam_eos``) laid out as::

  mnist/train-images-idx3-ubyte.gz      (and the three other IDX files)
  cifar10/cifar-10-binary.tar.gz        (official archive; extracted once to)
  cifar10/cifar-10-batches-bin/*.bin    (official binary batches)
  cifar10/data_batch_1.first4000.bin.xz (optional partial copies)
  cifar10/test_batch.first1000.bin.xz
  tinyshakespeare/input.txt

Each request is served, in this order, from the full files in the data folder,
from the partial CIFAR-10 copies when they hold enough examples, from the
small real subset bundled with the package (the first 2,000 MNIST training
images, the first 1,000 CIFAR-10 training images, the whole Tiny Shakespeare
text), and finally by downloading the canonical file once. Every file is
checked against its known SHA-256 before it is parsed (once per file version
and process), and downloads are verified before they are atomically moved
into place. Offline, a missing file raises ``DataUnavailableError`` naming the
file, its URL and the folder to put it in.

References:
  Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability",
  arXiv:2309.12488, 2023 (Section 4: MNIST, CIFAR-10, Tiny Shakespeare).
  LeCun, Cortes & Burges, "The MNIST database of handwritten digits", 1998.
  Krizhevsky, "Learning Multiple Layers of Features from Tiny Images",
  technical report, University of Toronto, 2009.
  Karpathy, char-rnn, 2015 (the Tiny Shakespeare corpus).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import lzma
import math
import os
import pathlib
import shutil
import tarfile
import tempfile
import urllib.request
from typing import BinaryIO, Callable

import numpy as np

ENV_VAR = "SAM_EOS_DATA"
DEFAULT_DATA_DIR = "~/.cache/sam_eos"
BUNDLED_DIR = pathlib.Path(__file__).resolve().parent / "bundled"

MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published with the archive
SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/"
    "master/data/tinyshakespeare/input.txt"
)

NUM_SHAKESPEARE_TEST_LINES = 10_000
SHAKESPEARE_VOCAB_SIZE = 128
BUNDLED_MNIST_TRAIN = 2_000
BUNDLED_CIFAR10_TRAIN = 1_000
BUNDLED_MNIST_TEST = 1_000
BUNDLED_CIFAR10_TEST = 1_000

_CIFAR_DIR = "cifar10/cifar-10-batches-bin"
_CIFAR_TAR = "cifar10/cifar-10-binary.tar.gz"
_CIFAR_RECORD = 1 + 32 * 32 * 3
_CIFAR_PER_BATCH = 10_000
_CIFAR_BATCHES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_CIFAR_PARTIAL = {
    "train": ("cifar10/data_batch_1.first4000.bin.xz", 4_000),
    "test": ("cifar10/test_batch.first1000.bin.xz", 1_000),
}
_SIZES = {
    "mnist": {"train": 60_000, "test": 10_000},
    "cifar10": {"train": 50_000, "test": 10_000},
}

# Known SHA-256 of every file read, by path relative to the data folder.
# MNIST: the values TensorFlow Datasets pins (the files also match the
# published MD5s). CIFAR-10 archive: SHA-256 of the archive whose published
# MD5 is CIFAR10_MD5 (170,052,171 bytes), as pinned by gomlx and by
# torchvision-ruby, which also pins the six extracted batches. Partial
# CIFAR-10 copies and Tiny Shakespeare: shared/data/README.md of this project.
SHA256 = {
    "mnist/train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "mnist/train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "mnist/t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "mnist/t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    _CIFAR_TAR: "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    f"{_CIFAR_DIR}/data_batch_1.bin": "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
    f"{_CIFAR_DIR}/data_batch_2.bin": "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
    f"{_CIFAR_DIR}/data_batch_3.bin": "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
    f"{_CIFAR_DIR}/data_batch_4.bin": "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
    f"{_CIFAR_DIR}/data_batch_5.bin": "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
    f"{_CIFAR_DIR}/test_batch.bin": "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
    "cifar10/data_batch_1.first4000.bin.xz": "ac4ba4529b64050c3834b115802494bc12d2d4fbf2471a5f09f8d051f6b386ed",
    "cifar10/test_batch.first1000.bin.xz": "1508cd774b288c812b8e9ca984d118812cb2ffa7e41264475c2cb11551b4bd80",
    "tinyshakespeare/input.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
}

# The bundled subset (see bundled/README.md; rebuilt by bundled/make_bundle.py).
BUNDLED_SHA256 = {
    "mnist-train-images-idx3-ubyte.first2000.gz": "d747f627e508234c9c7e49073a627f4195b719626ac15a67258d16f8371b9dd7",
    "mnist-train-labels-idx1-ubyte.first2000.gz": "4857b7883e0731d51eb3acbd00b844f68d431ded9207b94c2bb8122152f83738",
    "cifar10-data_batch_1.first1000.bin.xz": "a67fbcab15335c85b45a9ffa4a3a8b52c29b9319e52eb0f3341546091d1126dc",
    "mnist-t10k-images-idx3-ubyte.first1000.gz": "c38842f3fc122aeb56961328eacf41c4315fb33e95ce0e9d0c97f3bd3d5b62c6",
    "mnist-t10k-labels-idx1-ubyte.first1000.gz": "689b4d1da0ae1049125d2f91e157009a132a2a1e76b45a178dc0b359e1f74255",
    "cifar10-test_batch.first1000.bin.xz": "1508cd774b288c812b8e9ca984d118812cb2ffa7e41264475c2cb11551b4bd80",
    "tinyshakespeare-input.txt.gz": "bf237b9f5a05abe79d7a0caa809b6513fbcbc323e9521a77086d556e4c9bbed8",
}

URLS = {
    **{
        f"mnist/{p}-{k}-idx{d}-ubyte.gz": f"{MNIST_URL}{p}-{k}-idx{d}-ubyte.gz"
        for p in ("train", "t10k")
        for k, d in (("images", 3), ("labels", 1))
    },
    _CIFAR_TAR: CIFAR10_URL,
    "tinyshakespeare/input.txt": SHAKESPEARE_URL,
}

_logger = logging.getLogger(__name__)
_verified: set[tuple[str, int, int, str]] = set()


class DataUnavailableError(FileNotFoundError):
  """A data file is missing and could not be downloaded.

  The message names the file, the URL to fetch it from and the folder to put
  it in.
  """


class DataChecksumError(ValueError):
  """A data file's SHA-256 differs from the known value (corrupt or wrong)."""


def resolve_data_dir(
    data_dir: str | os.PathLike[str] | None = None,
) -> pathlib.Path:
  """The data folder: ``data_dir``, else ``$SAM_EOS_DATA``, else the cache.

  Args:
    data_dir: an explicit folder, or None.

  Returns:
    The folder as an absolute path (``~`` expanded); it need not exist.

  Examples:
    >>> str(resolve_data_dir("/tmp/sam_eos_data"))
    '/tmp/sam_eos_data'
  """
  if data_dir is None:
    data_dir = os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR
  return pathlib.Path(data_dir).expanduser().absolute()


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _verify(path: pathlib.Path, sha256: str, remedy: str) -> None:
  """Raises DataChecksumError unless ``path`` hashes to ``sha256``.

  The error message names the file and ends with ``remedy``. A success is remembered for this path, modification time and size, so a
  file is hashed once per process and version.
  """
  stat = path.stat()
  key = (str(path), stat.st_mtime_ns, stat.st_size, sha256)
  if key in _verified:
    return
  actual = _sha256(path)
  if actual != sha256:
    raise DataChecksumError(
        f"{path} is corrupt or not the expected file: its SHA-256 is {actual}, "
        f"expected {sha256}. {remedy}"
    )
  _verified.add(key)


def _download(url: str, path: pathlib.Path) -> None:
  """Writes the content at ``url`` to ``path`` (replaced in tests)."""
  with (
      urllib.request.urlopen(url, timeout=60) as response,
      open(path, "wb") as f,
  ):
    shutil.copyfileobj(response, f, 1 << 20)


def _missing_message(rel: str, root: pathlib.Path, reason: str) -> str:
  path = root / rel
  return (
      f"{path.name} is not available: {reason}. Download it from "
      f"{URLS[rel]} and put it in the folder {path.parent} (or point "
      f"${ENV_VAR} or data_dir= at a folder that holds {rel})."
  )


def _writable(folder: pathlib.Path) -> bool:
  """Whether files can be created in ``folder`` (or where it would be made)."""
  while not folder.exists() and folder.parent != folder:
    folder = folder.parent
  return os.access(folder, os.W_OK)


def _fetch(rel: str, root: pathlib.Path) -> pathlib.Path:
  """Downloads the file ``rel`` once: temporary folder, verify, atomic rename.

  The bytes go to a hidden temporary folder ``root/.download-*`` (removed
  on success and on any error), never beside the data files under a
  partial name.

  Raises:
    DataUnavailableError: the data folder is not writable, or the download
      failed (offline, interrupted transfer).
    DataChecksumError: the downloaded bytes have the wrong SHA-256.
  """
  path = root / rel
  url = URLS[rel]
  if not _writable(path.parent):
    raise DataUnavailableError(
        _missing_message(
            rel,
            root,
            f"the data folder {path.parent} is not writable, so it "
            "cannot be downloaded there",
        )
    )
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp_dir:
      tmp = pathlib.Path(tmp_dir) / path.name
      _logger.info("Downloading %s to %s", url, path)
      _download(url, tmp)
      _verify(
          tmp,
          SHA256[rel],
          remedy=f"The download from {url} was "
          "discarded; try again, or fetch the file by hand.",
      )
      os.replace(tmp, path)
  # urllib's URLError is an OSError; a cut transfer an HTTPException.
  except (OSError, http.client.HTTPException) as e:
    raise DataUnavailableError(
        _missing_message(rel, root, f"downloading it failed ({e})")
    ) from e
  return path


def _local(rel: str, root: pathlib.Path) -> pathlib.Path:
  """The verified path of ``rel`` under ``root`` (which must exist)."""
  path = root / rel
  if rel in URLS:
    remedy = f"Delete it and fetch it again from {URLS[rel]}."
  elif rel.startswith(_CIFAR_DIR):
    remedy = (
        f"Delete it and extract it again from {_CIFAR_TAR} " f"({CIFAR10_URL})."
    )
  else:
    remedy = (
        "Delete it and copy it again from the project's shared data "
        "folder (see its README.md)."
    )
  _verify(path, SHA256[rel], remedy=remedy)
  return path


def _bundled(name: str) -> pathlib.Path:
  path = BUNDLED_DIR / name
  _verify(
      path,
      BUNDLED_SHA256[name],
      remedy="Reinstall sam_eos, or rebuild the file with "
      "bundled/make_bundle.py.",
  )
  return path


def _check_split(split: str) -> str:
  if split not in ("train", "test"):
    raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
  return split


def _check_num_examples(
    num_examples: int | None, total: int, dataset: str, split: str
) -> int:
  if num_examples is None:
    return total
  if (
      isinstance(num_examples, bool)
      or not isinstance(num_examples, (int, np.integer))
      or not 1 <= num_examples <= total
  ):
    raise ValueError(
        f"`num_examples` must be an integer in [1, {total}] (the "
        f"size of the {dataset} {split} split) or None for all, "
        f"got {num_examples!r}."
    )
  return int(num_examples)


def _read_exactly(f: BinaryIO, size: int, path: pathlib.Path) -> bytes:
  data = f.read(size)
  if len(data) != size:
    raise DataChecksumError(
        f"{path} ends early ({len(data)} of {size} bytes "
        "read); delete it and fetch it again."
    )
  return data


def _read_idx(path: pathlib.Path, count: int) -> np.ndarray:
  """Reads the first ``count`` items of a gzip IDX file of unsigned bytes.

  IDX: a magic number whose last byte is the number of dimensions, then each
  dimension as a big-endian uint32, then the data in row-major order.
  """
  with gzip.open(path, "rb") as f:
    ndim = _read_exactly(f, 4, path)[3]
    dims = np.frombuffer(_read_exactly(f, 4 * ndim, path), ">u4")
    shape = (count, *(int(d) for d in dims[1:]))
    data = _read_exactly(f, math.prod(shape), path)
  return np.frombuffer(data, np.uint8).reshape(shape)


def load_mnist(
    split: str = "train",
    *,
    num_examples: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Loads MNIST images and labels in the official order.

  Reads the four original IDX files (``mnist/*-ubyte.gz``); without them, a
  request for at most 2,000 training examples is served from the bundled
  subset (the first 2,000 training images), and anything else downloads the
  missing files once.

  Args:
    split: ``"train"`` (60,000 examples) or ``"test"`` (10,000).
    num_examples: how many examples, from the start of the split; None for
      all.
    data_dir: the data folder; default ``$SAM_EOS_DATA`` or
      ``~/.cache/sam_eos``.

  Returns:
    ``(images, labels)``: uint8 arrays of shapes ``(N, 28, 28)`` and ``(N,)``.

  Raises:
    ValueError: for a bad ``split`` or ``num_examples``.
    DataUnavailableError: a needed file is missing and cannot be downloaded.
    DataChecksumError: a file does not have the known SHA-256.

  Examples:
    >>> images, labels = load_mnist(num_examples=3)
    >>> images.shape, images.dtype, labels.tolist()
    ((3, 28, 28), dtype('uint8'), [5, 0, 4])

  References:
    LeCun, Cortes & Burges, "The MNIST database of handwritten digits", 1998
    (CC BY-SA 3.0).
  """
  split = _check_split(split)
  num = _check_num_examples(
      num_examples, _SIZES["mnist"][split], "MNIST", split
  )
  root = resolve_data_dir(data_dir)
  prefix = "train" if split == "train" else "t10k"
  rels = [
      f"mnist/{prefix}-{kind}-ubyte.gz"
      for kind in ("images-idx3", "labels-idx1")
  ]
  if all((root / rel).exists() for rel in rels):
    paths = [_local(rel, root) for rel in rels]
  elif num <= (BUNDLED_MNIST_TRAIN if split == "train" else BUNDLED_MNIST_TEST):
    count = BUNDLED_MNIST_TRAIN if split == "train" else BUNDLED_MNIST_TEST
    paths = [
        _bundled(f"mnist-{rel.split('/')[1][:-3]}.first{count}.gz")
        for rel in rels
    ]
  else:
    paths = [
        _local(rel, root) if (root / rel).exists() else _fetch(rel, root)
        for rel in rels
    ]
  return _read_idx(paths[0], num), _read_idx(paths[1], num)


def _read_records(
    path: pathlib.Path, count: int, opener: Callable[..., BinaryIO] = open
) -> np.ndarray:
  """The first ``count`` CIFAR-10 binary records of a (compressed) file."""
  with opener(path, "rb") as f:
    data = _read_exactly(f, count * _CIFAR_RECORD, path)
  return np.frombuffer(data, np.uint8).reshape(count, _CIFAR_RECORD)


def _extract_cifar(root: pathlib.Path) -> None:
  """Extracts the six binary batches of the verified archive, atomically.

  Only the expected regular members are written (no arbitrary paths), each
  checked against its SHA-256 before it is renamed into place.
  """
  tar_path = _local(_CIFAR_TAR, root)
  out_dir = root / _CIFAR_DIR
  wanted = {
      f"cifar-10-batches-bin/{name}": name
      for names in _CIFAR_BATCHES.values()
      for name in names
  }
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp_dir,
        tarfile.open(tar_path, "r:gz") as tar,
    ):
      for member in tar:
        name = wanted.pop(member.name, None)
        if name is None or not member.isfile():
          continue
        tmp = pathlib.Path(tmp_dir) / name
        with tar.extractfile(member) as src, open(tmp, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
        _verify(
            tmp,
            SHA256[f"{_CIFAR_DIR}/{name}"],
            remedy=f"The archive {tar_path} is damaged: delete it and "
            f"fetch it again from {CIFAR10_URL}.",
        )
        os.replace(tmp, out_dir / name)
  except (OSError, tarfile.TarError) as e:
    raise DataUnavailableError(
        f"Could not extract {tar_path} into {out_dir} ({e}). Extract it by "
        f"hand (tar -xzf {tar_path.name}) in {tar_path.parent}."
    ) from e
  if wanted:
    raise DataChecksumError(
        f"{tar_path} lacks {sorted(wanted)}; delete it and "
        f"fetch it again from {CIFAR10_URL}."
    )


def load_cifar10(
    split: str = "train",
    *,
    num_examples: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Loads CIFAR-10 images (NHWC) and labels in the official order.

  Sources, in order: the official binary batches
  (``cifar10/cifar-10-batches-bin/*.bin``), the official archive
  ``cifar10/cifar-10-binary.tar.gz`` (extracted once into the former), the
  partial copies ``cifar10/data_batch_1.first4000.bin.xz`` (first 4,000
  training images) and ``cifar10/test_batch.first1000.bin.xz`` (first 1,000
  test images) when they hold enough examples, the bundled first 1,000
  training images, and last a one-time download of the archive (162 MB).

  Args:
    split: ``"train"`` (50,000 examples) or ``"test"`` (10,000).
    num_examples: how many examples, from the start of the split; None for
      all.
    data_dir: the data folder; default ``$SAM_EOS_DATA`` or
      ``~/.cache/sam_eos``.

  Returns:
    ``(images, labels)``: uint8 arrays of shapes ``(N, 32, 32, 3)`` and
    ``(N,)``.

  Raises:
    ValueError: for a bad ``split`` or ``num_examples``.
    DataUnavailableError: the request exceeds what is available locally and
      the archive cannot be downloaded; the message says how many examples
      are available and where to get the full file.
    DataChecksumError: a file does not have the known SHA-256.

  Examples:
    >>> images, labels = load_cifar10(num_examples=4)
    >>> images.shape, labels.tolist(), images[0, 0, 0].tolist()
    ((4, 32, 32, 3), [6, 9, 9, 4], [59, 62, 63])

  References:
    Krizhevsky, "Learning Multiple Layers of Features from Tiny Images",
    technical report, University of Toronto, 2009.
  """
  split = _check_split(split)
  num = _check_num_examples(
      num_examples, _SIZES["cifar10"][split], "CIFAR-10", split
  )
  root = resolve_data_dir(data_dir)
  batches = _CIFAR_BATCHES[split][: math.ceil(num / _CIFAR_PER_BATCH)]
  partial_rel, partial_count = _CIFAR_PARTIAL[split]
  have_batches = all((root / _CIFAR_DIR / b).exists() for b in batches)
  if not have_batches and (root / _CIFAR_TAR).exists():
    _extract_cifar(root)
    have_batches = True
  if have_batches:
    parts = []
    for i, name in enumerate(batches):
      count = min(_CIFAR_PER_BATCH, num - i * _CIFAR_PER_BATCH)
      parts.append(_read_records(_local(f"{_CIFAR_DIR}/{name}", root), count))
    records = np.concatenate(parts)
  elif (root / partial_rel).exists() and num <= partial_count:
    records = _read_records(_local(partial_rel, root), num, lzma.open)
  elif split == "train" and num <= BUNDLED_CIFAR10_TRAIN:
    records = _read_records(
        _bundled("cifar10-data_batch_1.first1000.bin.xz"), num, lzma.open
    )
  elif split == "test" and num <= BUNDLED_CIFAR10_TEST:
    records = _read_records(
        _bundled("cifar10-test_batch.first1000.bin.xz"), num, lzma.open
    )
  else:
    bundled = (
        BUNDLED_CIFAR10_TRAIN if split == "train" else BUNDLED_CIFAR10_TEST
    )
    available = [
        f"{partial_count} (in {root / partial_rel})"
        if (root / partial_rel).exists()
        else "",
        f"{bundled} (bundled with sam_eos)",
    ]
    have = " or ".join(a for a in available if a)
    held = (
        f"the local copies hold only the first {have}"
        if have
        else "there is no local copy"
    )
    try:
      _fetch(_CIFAR_TAR, root)
    except DataUnavailableError as e:
      raise DataUnavailableError(
          f"{num} CIFAR-10 {split} images were requested, but {held}; the "
          f"full data set is in {CIFAR10_URL}. {e}"
      ) from e
    return load_cifar10(split, num_examples=num, data_dir=root)
  labels = records[:, 0].copy()
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def load_shakespeare(
    split: str = "train", *, data_dir: str | os.PathLike[str] | None = None
) -> np.ndarray:
  """Loads the Tiny Shakespeare text as bytes (a vocabulary of 128).

  The last 10,000 lines are the test split and the lines before them the
  training split, as in the paper. Reads ``tinyshakespeare/input.txt``, else
  the identical copy bundled with the package.

  Args:
    split: ``"train"`` or ``"test"``.
    data_dir: the data folder; default ``$SAM_EOS_DATA`` or
      ``~/.cache/sam_eos``.

  Returns:
    A uint8 array of shape ``(num_bytes,)``, every value below 128.

  Raises:
    ValueError: for a bad ``split``.
    DataChecksumError: the file does not have the known SHA-256.

  Examples:
    >>> text = load_shakespeare()
    >>> text[:14].tobytes(), len(text) + len(load_shakespeare("test"))
    (b'First Citizen:', 1115394)

  References:
    Karpathy, char-rnn (2015), ``data/tinyshakespeare/input.txt``; the works
    of William Shakespeare (public domain).
  """
  split = _check_split(split)
  root = resolve_data_dir(data_dir)
  rel = "tinyshakespeare/input.txt"
  if (root / rel).exists():
    text = _local(rel, root).read_bytes()
  else:
    with gzip.open(_bundled("tinyshakespeare-input.txt.gz"), "rb") as f:
      text = f.read()
  data = np.frombuffer(text, np.uint8)
  newlines = np.flatnonzero(data == ord("\n"))
  num_lines = len(newlines) + (0 if text.endswith(b"\n") else 1)
  start = newlines[num_lines - NUM_SHAKESPEARE_TEST_LINES - 1] + 1
  return data[:start] if split == "train" else data[start:]


def preprocess_images(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int = 10,
    reference: np.ndarray | None = None,
    standardize: bool = False,
    flatten: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """The paper's preprocessing: pixels / 256, centred; one-hot targets.

  ``x = images / 256 - mean(reference / 256)`` with the mean image (per
  pixel and channel) of ``reference``, the authors' preprocessing (their code
  subtracts the mean training image). With ``standardize``, ``x`` is also
  divided by the per-pixel standard deviation of ``reference``, as Cohen et
  al. (2021) do for CIFAR-10 (zero-variance pixels are left unscaled).

  Args:
    images: uint8 images, shape ``(N, ...)``.
    labels: integer labels in ``[0, num_classes)``, shape ``(N,)``.
    num_classes: the number of classes.
    reference: images whose statistics are used, shape ``(M, ...)`` like
      ``images``; default ``images`` itself. Pass the training images when
      preprocessing a test set.
    standardize: also divide by the per-pixel standard deviation.
    flatten: reshape ``x`` to ``(N, prod(...))`` (e.g. 784 for an MLP).

  Returns:
    ``(x, y)``: float32 ``x`` of shape ``(N, ...)`` (or ``(N, D)``) and
    float32 one-hot ``y`` of shape ``(N, num_classes)``.

  Raises:
    ValueError: for mismatched shapes or labels out of range.

  Examples:
    >>> import numpy as np
    >>> x, y = preprocess_images(np.array([[0], [128]], np.uint8),
    ...                          np.array([1, 0]), num_classes=2)
    >>> x.ravel().tolist(), y.tolist()
    ([-0.25, 0.25], [[0.0, 1.0], [1.0, 0.0]])

  References:
    Long & Bartlett 2023, Section 4 and the authors' released code; Cohen,
    Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks
    Typically Occurs at the Edge of Stability", ICLR 2021, Appendix (data).
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  reference = images if reference is None else np.asarray(reference)
  if labels.shape != images.shape[:1]:
    raise ValueError(
        f"`labels` must have shape ({len(images)},) to match "
        f"`images` {images.shape}, got {labels.shape}."
    )
  if reference.shape[1:] != images.shape[1:]:
    raise ValueError(
        f"`reference` images {reference.shape} must have the "
        f"per-image shape of `images` {images.shape}."
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"`labels` must lie in [0, {num_classes}) for "
        f"num_classes={num_classes}, got values in "
        f"[{labels.min()}, {labels.max()}]."
    )
  mean = reference.mean(axis=0, dtype=np.float64) / 256.0
  x = images.astype(np.float32) / np.float32(256.0) - mean.astype(np.float32)
  if standardize:
    std = reference.std(axis=0, dtype=np.float64) / 256.0
    x /= np.where(std > 0, std, 1.0).astype(np.float32)
  if flatten:
    x = x.reshape(len(x), -1)
  return x, np.eye(num_classes, dtype=np.float32)[labels]


def char_crops(
    text: np.ndarray,
    *,
    num_crops: int,
    length: int = 65,
    seed: int | np.random.Generator = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Random crops of a byte text for next-character prediction.

  Draws ``num_crops`` windows of ``length`` consecutive bytes at uniform
  random offsets; each window gives ``length - 1`` inputs and the same
  window shifted by one as targets (64 + 1 characters in the paper).

  Args:
    text: uint8 text, shape ``(num_bytes,)`` with ``num_bytes >= length``.
    num_crops: number of windows, ``>= 1``.
    length: window length ``>= 2`` (context length + 1).
    seed: an integer seed or a ``numpy.random.Generator``.

  Returns:
    ``(inputs, targets)``: int32 arrays of shape
    ``(num_crops, length - 1)`` with ``targets[:, :-1] == inputs[:, 1:]``.

  Raises:
    ValueError: for a bad ``num_crops``, ``length`` or a too short text.

  Examples:
    >>> import numpy as np
    >>> inputs, targets = char_crops(np.frombuffer(b"abcd", np.uint8),
    ...                              num_crops=1, length=4)
    >>> inputs.tolist(), targets.tolist()
    ([[97, 98, 99]], [[98, 99, 100]])

  References:
    Long & Bartlett 2023, Section 4 (Tiny Shakespeare, sequence length 64).
  """
  text = np.asarray(text)
  if text.ndim != 1:
    raise ValueError(f"`text` must be 1-D, got shape {text.shape}.")
  if not isinstance(length, (int, np.integer)) or length < 2:
    raise ValueError(f"`length` must be an integer >= 2, got {length!r}.")
  if not isinstance(num_crops, (int, np.integer)) or num_crops < 1:
    raise ValueError(f"`num_crops` must be an integer >= 1, got {num_crops!r}.")
  if len(text) < length:
    raise ValueError(
        f"`text` has {len(text)} bytes, fewer than `length` " f"({length})."
    )
  starts = np.random.default_rng(seed).integers(
      0, len(text) - length + 1, size=num_crops
  )
  windows = text[starts[:, None] + np.arange(length)].astype(np.int32)
  return windows[:, :-1], windows[:, 1:]
