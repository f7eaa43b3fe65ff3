import gzip
import struct

import numpy as np
import pytest

from phalanx.data.idx import find_idx_files, read_idx, read_idx_pair
from phalanx.errors import DataError


def write_idx(path, arr: np.ndarray, gz=False, code=0x08):
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(">u1" if code == 0x08 else arr.dtype).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_reads_raw_and_gzipped(tmp_path, pair, gz):
    images, labels = pair
    im = write_idx(tmp_path / "train-images-idx3-ubyte", images, gz)
    lb = write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz)
    got_im, got_lb = read_idx_pair(im, lb)
    assert np.array_equal(got_im, images) and np.array_equal(got_lb, labels)
    assert got_lb.dtype == np.int64


def test_truncated_file_is_named(tmp_path, pair):
    p = write_idx(tmp_path / "x-images", pair[0])
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"x-images: truncated"):
        read_idx(p)


def test_truncated_gzip_is_named(tmp_path, pair):
    p = write_idx(tmp_path / "x-images.gz", pair[0], gz=True)
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"x-images.gz: cannot read"):
        read_idx(p)


def test_bad_magic(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match=r"junk: bad magic number 504b0304"):
        read_idx(p)


def test_count_mismatch_names_both_files(tmp_path, pair):
    images, labels = pair
    im = write_idx(tmp_path / "a-images", images)
    lb = write_idx(tmp_path / "a-labels", labels[:5])
    with pytest.raises(DataError, match=r"7 images but .*a-labels holds 5 labels"):
        read_idx_pair(im, lb)


def test_label_out_of_range(tmp_path, pair):
    images, labels = pair
    labels = labels.copy()
    labels[3] = 12
    im = write_idx(tmp_path / "a-images", images)
    lb = write_idx(tmp_path / "a-labels", labels)
    with pytest.raises(DataError, match=r"label 12 at index 3 is out of range 0..9"):
        read_idx_pair(im, lb)


def test_swapped_files_are_reported(tmp_path, pair):
    images, labels = pair
    im = write_idx(tmp_path / "a-images", images)
    lb = write_idx(tmp_path / "a-labels", labels)
    with pytest.raises(DataError, match=r"swapped"):
        read_idx_pair(lb, im)


def test_finds_mnist_style_names(tmp_path, pair):
    for stem, arr in (("train-images-idx3-ubyte", pair[0]), ("train-labels-idx1-ubyte", pair[1]),
                      ("t10k-images-idx3-ubyte", pair[0]), ("t10k-labels-idx1-ubyte", pair[1])):
        write_idx(tmp_path / (stem + ".gz"), arr, gz=True)
    found = find_idx_files(tmp_path)
    assert set(found) == {"train", "test"}
