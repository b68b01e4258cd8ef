"""Data loaders on the real files, checksums, downloads, bundled fallback."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pathlib
import tarfile

import numpy as np
import pytest

from sam_eos.experiments import data

REAL = data.resolve_data_dir()
needs_real = pytest.mark.skipif(
    not (REAL / "mnist/train-images-idx3-ubyte.gz").exists()
    or not (REAL / "cifar10/data_batch_1.first4000.bin.xz").exists(),
    reason="the real data folder (shared/data) is not available",
)

MNIST_TRAIN_COUNTS = [
    5923,
    6742,
    5958,
    6131,
    5842,
    5421,
    5918,
    6265,
    5851,
    5949,
]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_TRAIN_4000_COUNTS = [396, 366, 420, 384, 422, 393, 414, 385, 407, 413]
CIFAR_TEST_1000_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


# ----------------------------------------------------------------- real data


@needs_real
def test_mnist_real_files():
  images, labels = data.load_mnist("train")
  assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (60000,) and labels.dtype == np.uint8
  assert labels[0] == 5
  assert np.bincount(labels).tolist() == MNIST_TRAIN_COUNTS
  images, labels = data.load_mnist("test", num_examples=10000)
  assert images.shape == (10000, 28, 28)
  assert np.bincount(labels).tolist() == MNIST_TEST_COUNTS
  first, first_labels = data.load_mnist("test", num_examples=7)
  np.testing.assert_array_equal(first, images[:7])
  np.testing.assert_array_equal(first_labels, labels[:7])


@needs_real
def test_cifar10_real_partial_files():
  images, labels = data.load_cifar10("train", num_examples=4000)
  assert images.shape == (4000, 32, 32, 3) and images.dtype == np.uint8
  assert labels.dtype == np.uint8
  assert labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
  assert images[0, 0, 0].tolist() == [59, 62, 63]  # NHWC, RGB
  assert np.bincount(labels).tolist() == CIFAR_TRAIN_4000_COUNTS
  images, labels = data.load_cifar10("test", num_examples=1000)
  assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
  assert images[0, 0, 0].tolist() == [158, 112, 49]
  assert np.bincount(labels).tolist() == CIFAR_TEST_1000_COUNTS


@needs_real
def test_cifar10_partial_too_small_says_what_is_available():
  with pytest.raises(data.DataUnavailableError) as info:
    data.load_cifar10("train", num_examples=4001)
  message = str(info.value)
  assert "4001" in message and "first 4000" in message
  assert data.CIFAR10_URL in message
  assert str(REAL / "cifar10") in message


def test_shakespeare_splits_are_the_text_cut_at_a_line():
  train = data.load_shakespeare("train")
  test = data.load_shakespeare("test")
  whole = np.concatenate([train, test]).tobytes()
  assert (
      hashlib.sha256(whole).hexdigest()
      == data.SHA256["tinyshakespeare/input.txt"]
  )
  assert train.dtype == np.uint8 and whole.startswith(b"First Citizen:")
  assert train[-1] == ord("\n")
  assert test.tobytes().count(b"\n") == data.NUM_SHAKESPEARE_TEST_LINES
  assert max(train.max(), test.max()) < data.SHAKESPEARE_VOCAB_SIZE


# ----------------------------------------------------------- bundled subset


def test_bundled_fallback_is_the_first_real_examples(tmp_path):
  images, labels = data.load_mnist(num_examples=2000, data_dir=tmp_path)
  assert images.shape == (2000, 28, 28) and labels[0] == 5
  cifar, cifar_labels = data.load_cifar10(num_examples=1000, data_dir=tmp_path)
  assert cifar.shape == (1000, 32, 32, 3)
  assert cifar_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
  text = data.load_shakespeare("test", data_dir=tmp_path)
  assert list(tmp_path.iterdir()) == []  # nothing downloaded or written
  if (REAL / "mnist/train-images-idx3-ubyte.gz").exists():
    real_images, real_labels = data.load_mnist(num_examples=2000)
    np.testing.assert_array_equal(images, real_images)
    np.testing.assert_array_equal(labels, real_labels)
    real_cifar, real_cifar_labels = data.load_cifar10(num_examples=1000)
    np.testing.assert_array_equal(cifar, real_cifar)
    np.testing.assert_array_equal(cifar_labels, real_cifar_labels)
    np.testing.assert_array_equal(text, data.load_shakespeare("test"))


def test_bundled_files_match_their_recorded_hashes():
  for name, sha in data.BUNDLED_SHA256.items():
    digest = hashlib.sha256((data.BUNDLED_DIR / name).read_bytes()).hexdigest()
    assert digest == sha, name
  total = sum(
      (data.BUNDLED_DIR / n).stat().st_size for n in data.BUNDLED_SHA256
  )
  assert total < 6_000_000  # the 1,000-image MNIST and CIFAR-10 test subsets


@pytest.mark.parametrize(
    "load, num, url, folder",
    [
        (
            data.load_mnist,
            2001,
            data.MNIST_URL + "train-images-idx3-ubyte.gz",
            "mnist",
        ),
        (data.load_cifar10, 1001, data.CIFAR10_URL, "cifar10"),
    ],
)
def test_request_beyond_bundle_offline_is_a_clear_error(
    tmp_path, load, num, url, folder
):
  with pytest.raises(data.DataUnavailableError) as info:
    load("train", num_examples=num, data_dir=tmp_path)
  assert isinstance(info.value, FileNotFoundError)
  message = str(info.value)
  assert url in message and "network access is disabled" in message
  assert f"folder {tmp_path / folder}" in message
  if load is data.load_cifar10:
    assert "1001" in message and "first 1000 (bundled" in message
  assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_missing_test_split_offline_names_file_url_and_folder(tmp_path):
  with pytest.raises(data.DataUnavailableError) as info:
    data.load_mnist("test", data_dir=tmp_path)
  message = str(info.value)
  assert "t10k-images-idx3-ubyte.gz" in message
  assert data.MNIST_URL + "t10k-images-idx3-ubyte.gz" in message
  assert f"folder {tmp_path / 'mnist'}" in message


# --------------------------------------------------------------- checksums


def _corrupt_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
  dst.parent.mkdir(parents=True, exist_ok=True)
  content = bytearray(src.read_bytes())
  content[len(content) // 2] ^= 0xFF
  dst.write_bytes(bytes(content))


def test_checksum_mismatch_raises_and_names_the_file(tmp_path):
  bad = tmp_path / "tinyshakespeare/input.txt"
  with gzip.open(data.BUNDLED_DIR / "tinyshakespeare-input.txt.gz") as f:
    good = f.read()
  bad.parent.mkdir()
  bad.write_bytes(good[:-1] + b"?")
  with pytest.raises(data.DataChecksumError) as info:
    data.load_shakespeare(data_dir=tmp_path)
  assert isinstance(info.value, ValueError)
  assert str(bad) in str(info.value) and "Delete it" in str(info.value)


@needs_real
def test_corrupt_mnist_file_is_never_parsed(tmp_path):
  (tmp_path / "mnist").mkdir()
  os.symlink(
      REAL / "mnist/train-images-idx3-ubyte.gz",
      tmp_path / "mnist/train-images-idx3-ubyte.gz",
  )
  _corrupt_copy(
      REAL / "mnist/train-labels-idx1-ubyte.gz",
      tmp_path / "mnist/train-labels-idx1-ubyte.gz",
  )
  with pytest.raises(data.DataChecksumError, match="train-labels"):
    data.load_mnist(num_examples=10, data_dir=tmp_path)


def test_verification_is_cached_per_file_version(tmp_path, monkeypatch):
  path = tmp_path / "tinyshakespeare/input.txt"
  path.parent.mkdir()
  with gzip.open(data.BUNDLED_DIR / "tinyshakespeare-input.txt.gz") as f:
    good = f.read()
  path.write_bytes(good)
  calls = []
  real_sha256 = data._sha256
  monkeypatch.setattr(
      data, "_sha256", lambda p: calls.append(p) or real_sha256(p)
  )
  data.load_shakespeare(data_dir=tmp_path)
  data.load_shakespeare("test", data_dir=tmp_path)
  assert calls == [path]
  # A changed file (same size, new mtime) is hashed again and rejected.
  path.write_bytes(good[:-1] + b"?")
  os.utime(path, ns=(1, 1))
  with pytest.raises(data.DataChecksumError):
    data.load_shakespeare(data_dir=tmp_path)
  assert calls == [path, path]


# --------------------------------------------------------------- downloads


def test_mocked_download_is_verified_and_renamed_atomically(
    tmp_path, monkeypatch
):
  labels = np.arange(10000, dtype=np.uint8) % 10
  images = np.arange(10000 * 784, dtype=np.uint64).astype(np.uint8)
  contents = {
      "t10k-labels-idx1-ubyte.gz": gzip.compress(
          np.array([2049, 10000], ">u4").tobytes() + labels.tobytes()
      ),
      "t10k-images-idx3-ubyte.gz": gzip.compress(
          np.array([2051, 10000, 28, 28], ">u4").tobytes() + images.tobytes()
      ),
  }
  for name, content in contents.items():
    monkeypatch.setitem(
        data.SHA256, f"mnist/{name}", hashlib.sha256(content).hexdigest()
    )
  requested = []

  def fake_download(url, path):
    name = url.rsplit("/", 1)[-1]
    final = tmp_path / "mnist" / name
    assert path.parent != final.parent  # a temporary folder, then renamed
    assert not final.exists()
    requested.append(url)
    path.write_bytes(contents[name])

  monkeypatch.setattr(data, "_download", fake_download)
  got_images, got_labels = data.load_mnist("test", data_dir=tmp_path)
  assert requested == [
      data.MNIST_URL + "t10k-images-idx3-ubyte.gz",
      data.MNIST_URL + "t10k-labels-idx1-ubyte.gz",
  ]
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_array_equal(got_images.ravel(), images)
  assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(
      contents
  )
  assert sorted(
      p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
  ) == ["mnist"] + sorted(f"mnist/{n}" for n in contents)
  # Downloaded once: a second load reads the cache.
  data.load_mnist("test", num_examples=3, data_dir=tmp_path)
  assert len(requested) == 2


def test_corrupt_download_is_rejected_and_removed(tmp_path, monkeypatch):
  monkeypatch.setattr(
      data,
      "_download",
      lambda url, path: path.write_bytes(b"<html>error</html>"),
  )
  with pytest.raises(data.DataChecksumError, match="download"):
    data.load_mnist("test", data_dir=tmp_path)
  assert list((tmp_path / "mnist").iterdir()) == []


def test_failed_download_leaves_no_partial_file(tmp_path, monkeypatch):
  def broken_download(url, path):
    path.write_bytes(b"half a fi")
    raise http.client.IncompleteRead(b"half a fi")

  monkeypatch.setattr(data, "_download", broken_download)
  with pytest.raises(data.DataUnavailableError, match="downloading it failed"):
    data.load_mnist("test", data_dir=tmp_path)
  assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []


def test_read_only_data_folder_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_writable", lambda folder: False)
  with pytest.raises(data.DataUnavailableError, match="not writable"):
    data.load_mnist("test", data_dir=tmp_path)
  assert list(tmp_path.iterdir()) == []


def _cifar_archive(monkeypatch, per_batch=3):
  """A tiny stand-in for the official archive, with matching hashes."""
  monkeypatch.setattr(data, "_CIFAR_PER_BATCH", per_batch)
  rng = np.random.default_rng(0)
  buffer = io.BytesIO()
  batches = {}
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    evil = b"not a batch"
    info = tarfile.TarInfo("../evil.bin")
    info.size = len(evil)
    tar.addfile(info, io.BytesIO(evil))
    for names in data._CIFAR_BATCHES.values():
      for name in names:
        records = rng.integers(0, 256, (per_batch, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        content = records.tobytes()
        batches[name] = records
        monkeypatch.setitem(
            data.SHA256,
            f"{data._CIFAR_DIR}/{name}",
            hashlib.sha256(content).hexdigest(),
        )
        info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
  archive = buffer.getvalue()
  monkeypatch.setitem(
      data.SHA256, data._CIFAR_TAR, hashlib.sha256(archive).hexdigest()
  )
  return archive, batches


def test_cifar10_archive_download_extract_and_batches(tmp_path, monkeypatch):
  archive, batches = _cifar_archive(monkeypatch)
  monkeypatch.setattr(data, "BUNDLED_CIFAR10_TRAIN", 5)  # 7 must download
  monkeypatch.setattr(
      data, "_download", lambda url, path: path.write_bytes(archive)
  )
  images, labels = data.load_cifar10("train", num_examples=7, data_dir=tmp_path)
  expected = np.concatenate(
      [batches[f"data_batch_{i}.bin"] for i in (1, 2, 3)]
  )[:7]
  np.testing.assert_array_equal(labels, expected[:, 0])
  np.testing.assert_array_equal(
      images, expected[:, 1:].reshape(7, 3, 32, 32).transpose(0, 2, 3, 1)
  )
  extracted = tmp_path / data._CIFAR_DIR
  assert sorted(p.name for p in extracted.iterdir()) == sorted(batches)
  assert not (tmp_path / "evil.bin").exists()
  # The extracted batches serve later loads without the archive.
  (tmp_path / data._CIFAR_TAR).unlink()
  monkeypatch.setattr(
      data,
      "_download",
      lambda url, path: pytest.fail(f"downloaded {url} again"),
  )
  test_images, test_labels = data.load_cifar10("test", data_dir=tmp_path)
  np.testing.assert_array_equal(test_labels, batches["test_batch.bin"][:, 0])
  assert test_images.shape == (3, 32, 32, 3)


def test_cifar10_archive_missing_a_batch_is_rejected(tmp_path, monkeypatch):
  archive, _ = _cifar_archive(monkeypatch)
  path = tmp_path / data._CIFAR_TAR
  path.parent.mkdir(parents=True)
  with (
      tarfile.open(fileobj=io.BytesIO(archive)) as src,
      tarfile.open(path, "w:gz") as dst,
  ):
    for member in src:
      if not member.name.endswith("test_batch.bin"):
        dst.addfile(member, src.extractfile(member))
  monkeypatch.setitem(data.SHA256, data._CIFAR_TAR, data._sha256(path))
  with pytest.raises(data.DataChecksumError, match="test_batch.bin"):
    data.load_cifar10("train", num_examples=2, data_dir=tmp_path)


# --------------------------------------------------------------- arguments


def test_data_dir_resolution(monkeypatch, tmp_path):
  assert data.resolve_data_dir(tmp_path) == tmp_path
  monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
  assert data.resolve_data_dir() == tmp_path / "env"
  monkeypatch.delenv(data.ENV_VAR)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert data.resolve_data_dir() == tmp_path / ".cache/sam_eos"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "valid"}, "`split`"),
        ({"num_examples": 0}, r"\[1, 60000\]"),
        ({"num_examples": 60001}, "num_examples"),
        ({"num_examples": 2.0}, "num_examples"),
        ({"num_examples": True}, "num_examples"),
    ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.load_mnist(**kwargs)


# ----------------------------------------------------------- preprocessing


def test_preprocess_images_centres_scales_and_one_hots():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 50)
  x, y = data.preprocess_images(images, labels)
  assert x.dtype == np.float32 and x.shape == images.shape
  np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-6)
  assert np.abs(x).max() < 1.0
  np.testing.assert_allclose(
      x[0], images[0] / 256 - images.mean(0) / 256, rtol=1e-6, atol=1e-7
  )
  assert y.dtype == np.float32 and y.shape == (50, 10)
  np.testing.assert_array_equal(y.sum(1), 1.0)
  np.testing.assert_array_equal(y.argmax(1), labels)


def test_preprocess_uses_reference_statistics_and_options():
  rng = np.random.default_rng(1)
  train = rng.integers(0, 256, (40, 3, 3), dtype=np.uint8)
  test = rng.integers(0, 256, (6, 3, 3), dtype=np.uint8)
  x, _ = data.preprocess_images(
      test, np.zeros(6, int), reference=train, flatten=True
  )
  assert x.shape == (6, 9)
  expected = (test / 256 - train.mean(0) / 256).reshape(6, 9)
  np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-7)
  z, _ = data.preprocess_images(train, np.zeros(40, int), standardize=True)
  np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=1e-5)
  np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "labels, kwargs, match",
    [
        (np.array([0, 10]), {}, r"\[0, 10\)"),
        (np.array([0, 1, 2]), {}, "shape"),
        (
            np.array([0, 1]),
            {"reference": np.zeros((3, 5), np.uint8)},
            "reference",
        ),
    ],
)
def test_preprocess_errors(labels, kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.preprocess_images(np.zeros((2, 4), np.uint8), labels, **kwargs)


def test_char_crops_are_shifted_windows_of_the_text():
  text = data.load_shakespeare("test")
  inputs, targets = data.char_crops(text, num_crops=16, seed=3)
  assert inputs.shape == targets.shape == (16, 64)
  assert inputs.dtype == np.int32
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  raw = text.tobytes()
  for row_in, row_t in zip(inputs, targets):
    window = bytes(row_in.astype(np.uint8)) + bytes([row_t[-1]])
    assert window in raw
  again, _ = data.char_crops(text, num_crops=16, seed=3)
  other, _ = data.char_crops(text, num_crops=16, seed=4)
  np.testing.assert_array_equal(inputs, again)
  assert not np.array_equal(inputs, other)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_crops": 0}, "num_crops"),
        ({"num_crops": 1, "length": 1}, "length"),
        ({"num_crops": 1, "length": 9}, "fewer"),
    ],
)
def test_char_crops_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.char_crops(np.zeros(8, np.uint8), **kwargs)
