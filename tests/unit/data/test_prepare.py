"""`phalanx data prepare`: ImageFolder, CIFAR binaries and idx folders into a prepared store."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from phalanx.commands.data import data as data_cli
from phalanx.data import prepare as P
from phalanx.data.imageio import decode_to_uint8
from phalanx.data.store import MANIFEST, is_store, open_store
from phalanx.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

BAD = {"cat/corrupt.jpg", "dog/zero.png"}


def make_imagefolder(root: Path, seed: int = 0) -> Path:
    """A messy ImageFolder: PNG and JPEG, sizes 20..44, modes RGB/L/RGBA/P, nested folders, a corrupt
    JPEG, a zero-byte PNG, a text file and an empty class folder."""
    rng = np.random.default_rng(seed)
    for c in ("cat", "dog", "empty", "owl"):
        (root / c).mkdir(parents=True, exist_ok=True)
    (root / "dog" / "nested" / "deeper").mkdir(parents=True, exist_ok=True)

    def img(mode, h, w):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(a)
        if mode == "L":
            return im.convert("L")
        if mode == "RGBA":
            return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        if mode == "P":
            return im.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        return im

    modes = ["RGB", "L", "RGBA", "P"]
    for i in range(6):
        img(modes[i % 4], 20 + 3 * i, 30).save(root / "cat" / f"c{i}.png")
        img("RGB" if i % 2 else "L", 36, 24 + 4 * i).save(root / "dog" / f"d{i}.jpg", quality=90)
        img(modes[(i + 1) % 4], 28, 28).save(root / "owl" / f"o{i}.png")
    img("RGB", 40, 44).save(root / "dog" / "nested" / "deeper" / "n0.jpg")
    img("P", 25, 25).save(root / "owl" / "nested.png")
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x13" * 300)
    (root / "dog" / "zero.png").write_bytes(b"")
    (root / "owl" / "README.txt").write_text("not an image")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_imagefolder(tmp_path / "src")


def expected_rows(src: Path, split: str, size: int, channels: int, skip=BAD):
    listing = P.list_imagefolder(src)
    entries = [(rel, lab) for rel, lab in listing.splits[split] if rel.replace(os.sep, "/") not in skip]
    return entries, [decode_to_uint8(src / rel, size, channels) for rel, _ in entries]


def no_partials(out: Path) -> bool:
    return not list(out.parent.glob(out.name + ".partial-*"))


def test_default_prepare_fails_listing_every_bad_file(folder, tmp_path):
    out = tmp_path / "store"
    with pytest.raises(DataError) as e:
        P.prepare(folder, out, size=16, workers=1, progress=False)
    msg = str(e.value)
    for rel in BAD:
        assert rel.replace("/", os.sep) in msg
    assert "2 unreadable" in msg and "--skip-bad" in msg
    assert not out.exists() and no_partials(out)


def test_skip_bad_store_holds_exactly_the_decoded_pixels(folder, tmp_path):
    out = P.prepare(folder, tmp_path / "store", size=16, channels=3, workers=1, skip_bad=True, progress=False)
    store = open_store(out)
    m = store.manifest
    assert sorted(s["path"].replace(os.sep, "/") for s in m["skipped"]) == sorted(BAD)
    assert all(s["reason"] for s in m["skipped"])
    assert store.classes == ["cat", "dog", "empty", "owl"]
    assert m["options"]["empty_classes"] == ["empty"]
    assert m["options"]["ignored_files"] == 1
    assert m["options"]["held_out"]["fraction"] == P.HELD_OUT_FRACTION
    for split in ("train", "test"):
        entries, want = expected_rows(folder, split, 16, 3)
        got = store[split]
        assert len(got) == len(entries) and m["splits"][split]["class_counts"][2] == 0
        np.testing.assert_array_equal(np.asarray(got.images), np.stack(want))
        np.testing.assert_array_equal(np.asarray(got.labels), [lab for _, lab in entries])
    all_files = [rel for s in P.list_imagefolder(folder).splits.values() for rel, _ in s]
    assert os.path.join("dog", "nested", "deeper", "n0.jpg") in all_files  # nested folders count
    store.verify()


def test_png_store_equals_pil_decode_when_no_resize_is_needed(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "pngs"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i, mode in enumerate(["RGB", "L", "RGBA", "P", "LA", "RGB"]):
            a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            im = Image.fromarray(a)
            im = im.convert(mode) if mode != "P" else im.convert("P", palette=Image.Palette.ADAPTIVE, colors=20)
            im.save(src / c / f"{i}.png")
    store = open_store(P.prepare(src, tmp_path / "s", workers=1, progress=False))
    assert store.shape == (16, 16, 3)  # native size kept; colour because some images have colour
    listing = P.list_imagefolder(src)
    for split in ("train", "test"):
        want = [np.asarray(Image.open(src / rel).convert("RGB")) for rel, _ in listing.splits[split]]
        np.testing.assert_array_equal(np.asarray(store[split].images), np.stack(want))


def test_size_and_channels_are_chosen_from_the_images(tmp_path):
    src = tmp_path / "gray"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12 + i, 20, 3), 40 * i, np.uint8)).convert("L").save(src / c / f"{i}.png")
    store = open_store(P.prepare(src, tmp_path / "s", workers=1, progress=False))
    assert store.shape == (P.DEFAULT_SIZE, P.DEFAULT_SIZE, 1)  # mixed sizes -> 64; all gray -> 1 channel


def test_interrupted_prepare_leaves_no_store_and_a_rerun_succeeds(folder, tmp_path, monkeypatch):
    out = tmp_path / "store"
    calls = {"n": 0}
    real = P.decode_to_uint8

    def dies_midway(*a):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return real(*a)

    monkeypatch.setattr(P, "decode_to_uint8", dies_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.prepare(folder, out, size=16, workers=1, skip_bad=True, progress=False)
    assert not is_store(out) and not out.exists() and no_partials(out)
    monkeypatch.setattr(P, "decode_to_uint8", real)
    assert is_store(P.prepare(folder, out, size=16, workers=1, skip_bad=True, progress=False))


def test_killed_prepare_is_not_taken_as_complete(folder, tmp_path):
    out = tmp_path / "store"
    code = (f"import time, phalanx.data.prepare as P\n"
            f"real = P.decode_to_uint8\n"
            f"def slow(*a):\n    time.sleep(0.2)\n    return real(*a)\n"
            f"P.decode_to_uint8 = slow\n"
            f"P.prepare({str(folder)!r}, {str(out)!r}, size=16, workers=1, skip_bad=True, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(tmp_path.glob("store.partial-*/train-images.npy")):
            time.sleep(0.05)
        assert list(tmp_path.glob("store.partial-*")), "the prepare never started writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not is_store(out)
    assert is_store(P.prepare(folder, out, size=16, workers=1, skip_bad=True, progress=False))
    assert no_partials(out), "the next prepare removes what the killed one left"


def test_rerun_is_idempotent_and_a_changed_tree_is_prepared_again(folder, tmp_path):
    out = tmp_path / "store"
    P.prepare(folder, out, size=16, workers=1, skip_bad=True, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    time.sleep(0.01)
    assert P.prepare(folder, out, size=16, workers=1, skip_bad=True, progress=False) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "owl" / "new.png")
    P.prepare(folder, out, size=16, workers=1, skip_bad=True, progress=False)
    assert (out / MANIFEST).stat().st_mtime_ns != stamps[MANIFEST]
    assert sum(len(s) for s in open_store(out).splits.values()) == 21
    P.prepare(folder, out, size=8, workers=1, skip_bad=True, progress=False)  # other options: rebuilt
    assert open_store(out).shape == (8, 8, 3)


def test_held_out_split_is_stratified_deterministic_and_disjoint(folder):
    a, b = P.list_imagefolder(folder), P.list_imagefolder(folder)
    assert a.splits == b.splits and a.layout == "classes"
    train = {rel for rel, _ in a.splits["train"]}
    test = {rel for rel, _ in a.splits["test"]}
    assert not train & test
    for label, name in enumerate(a.classes):
        n_test = sum(1 for _, lab in a.splits["test"] if lab == label)
        n_all = n_test + sum(1 for _, lab in a.splits["train"] if lab == label)
        assert n_test == (0 if n_all < 2 else max(1, round(0.1 * n_all))), name


def test_train_and_val_folders_are_the_splits(tmp_path):
    src = tmp_path / "tv"
    rng = np.random.default_rng(2)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("x", "y"):
            (src / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(src / split / c / f"{i}.png")
    assert P.detect_kind(src) == "imagefolder"
    store = open_store(P.prepare(src, tmp_path / "s", workers=1, progress=False))
    assert set(store.splits) == {"train", "val"} and len(store["train"]) == 8 and len(store["val"]) == 4
    assert store.manifest["options"]["layout"] == "splits" and store.manifest["options"]["held_out"] is None
    (src / "val" / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra"):
        P.prepare(src, tmp_path / "s2", workers=1, progress=False)


def test_parallel_workers_give_the_same_store_as_one(tmp_path):
    src = tmp_path / "many"
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(2 * P.DECODE_CHUNK // 2 + 3):
            Image.fromarray(rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)).save(src / c / f"{i}.jpg")
    (src / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 50)  # no header: found by the scan
    data = (src / "b" / "3.jpg").read_bytes()
    (src / "b" / "3.jpg").write_bytes(data[: len(data) * 2 // 3])  # header intact: found by the decode
    one = open_store(P.prepare(src, tmp_path / "one", size=12, workers=1, skip_bad=True, progress=False))
    two = open_store(P.prepare(src, tmp_path / "two", size=12, workers=2, skip_bad=True, progress=False))
    three = open_store(P.prepare(src, tmp_path / "three", size=12, channels=3, workers=2, skip_bad=True,
                                 progress=False))  # no scan: both found by the decode
    for split in one.splits:
        entries, want = expected_rows(src, split, 12, 3, skip={"a/broken.jpg", "b/3.jpg"})
        for store in (one, two, three):
            assert len(store[split]) == len(entries)
            np.testing.assert_array_equal(np.asarray(store[split].images), np.stack(want))
            np.testing.assert_array_equal(np.asarray(store[split].labels), [lab for _, lab in entries])
    assert one.manifest["skipped"] == two.manifest["skipped"]
    for store in (one, three):  # the reasons differ: the scan reads headers, the decode whole files
        assert [s["path"].replace(os.sep, "/") for s in store.manifest["skipped"]] == ["a/broken.jpg", "b/3.jpg"]


# ----------------------------------------------------------------------------- CIFAR binaries

def write_cifar(folder: Path, kind: str = "cifar10", n: int = 7, seed: int = 0) -> dict:
    """CIFAR binary files of n records each with known bytes; returns {file name: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = ([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"] if kind == "cifar10"
             else ["train.bin", "test.bin"])
    out = {}
    for name in names:
        chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        if kind == "cifar10":
            labels = rng.integers(0, 10, n, dtype=np.uint8)
            head = labels[:, None]
        else:
            labels = rng.integers(0, 100, n, dtype=np.uint8)
            head = np.stack([labels // 5, labels], 1).astype(np.uint8)
        (folder / name).write_bytes(np.concatenate([head, chw.reshape(n, -1)], 1).tobytes())
        out[name] = (chw.transpose(0, 2, 3, 1), labels.astype(np.int64))
    return out


def test_cifar10_binary_round_trips_exactly(tmp_path):
    data = write_cifar(tmp_path / "dl" / "cifar-10-batches-bin")
    (tmp_path / "dl" / "cifar-10-batches-bin" / "batches.meta.txt").write_text(
        "\n".join(P.CIFAR10_CLASSES[::-1]) + "\n\n")
    assert P.detect_kind(tmp_path / "dl") == "cifar10"
    assert P.detect_kind(tmp_path / "dl" / "cifar-10-batches-bin") == "cifar10"
    store = open_store(P.prepare(tmp_path / "dl", tmp_path / "store", progress=False))
    assert store.shape == (32, 32, 3) and store.classes == P.CIFAR10_CLASSES[::-1]
    train = [data[f"data_batch_{i}.bin"] for i in range(1, 6)]
    np.testing.assert_array_equal(np.asarray(store["train"].images), np.concatenate([t[0] for t in train]))
    np.testing.assert_array_equal(np.asarray(store["train"].labels), np.concatenate([t[1] for t in train]))
    np.testing.assert_array_equal(np.asarray(store["test"].images), data["test_batch.bin"][0])
    np.testing.assert_array_equal(np.asarray(store["test"].labels), data["test_batch.bin"][1])


def test_cifar100_uses_the_fine_label_and_can_resize(tmp_path):
    data = write_cifar(tmp_path / "c100", "cifar100")
    assert P.detect_kind(tmp_path / "c100") == "cifar100"
    store = open_store(P.prepare(tmp_path / "c100", tmp_path / "store", progress=False))
    assert len(store.classes) == 100 and store.classes[0] == "apple"
    np.testing.assert_array_equal(np.asarray(store["train"].labels), data["train.bin"][1])
    np.testing.assert_array_equal(np.asarray(store["train"].images), data["train.bin"][0])
    small = open_store(P.prepare(tmp_path / "c100", tmp_path / "small", size=16, channels=1, progress=False))
    assert small.shape == (16, 16, 1)


def test_truncated_or_mislabelled_cifar_file_is_refused_naming_it(tmp_path):
    write_cifar(tmp_path / "c")
    f = tmp_path / "c" / "data_batch_3.bin"
    good = f.read_bytes()
    f.write_bytes(good[:-1])
    with pytest.raises(DataError, match="data_batch_3.bin"):
        P.prepare(tmp_path / "c", tmp_path / "store", progress=False)
    f.write_bytes(good[:3073 * 5])  # whole records, but fewer than its siblings
    with pytest.raises(DataError, match="data_batch_3.bin: 5"):
        P.prepare(tmp_path / "c", tmp_path / "store", progress=False)
    bad = bytearray(good)
    bad[3073] = 10  # label of record 1
    f.write_bytes(bytes(bad))
    with pytest.raises(DataError, match=r"data_batch_3.bin: label 10 of record 1"):
        P.prepare(tmp_path / "c", tmp_path / "store", progress=False)
    assert not is_store(tmp_path / "store") and no_partials(tmp_path / "store")
    (tmp_path / "c" / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="missing: test_batch.bin"):
        P.prepare(tmp_path / "c", tmp_path / "store", progress=False)


def test_python_pickle_cifar_is_refused(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="pickle"):
        P.detect_kind(tmp_path)


def test_detect_kind_of_other_folders(tmp_path, folder):
    assert P.detect_kind(folder) == "imagefolder"
    (tmp_path / "nothing" / "sub").mkdir(parents=True)
    assert P.detect_kind(tmp_path / "nothing") is None
    assert P.detect_kind(tmp_path / "missing") is None


# ----------------------------------------------------------------------------- idx, CLI, training

def test_idx_folders_are_delegated(tmp_path):
    from tests.conftest import make_idx_dataset
    src = make_idx_dataset(tmp_path / "idx", 30, 20)
    store = open_store(P.prepare(src, tmp_path / "s", progress=False))
    assert store.shape == (28, 28, 1) and len(store["train"]) == 30
    mtime = (tmp_path / "s" / MANIFEST).stat().st_mtime_ns
    P.prepare(src, tmp_path / "s", progress=False)
    assert (tmp_path / "s" / MANIFEST).stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="--size"):
        P.prepare(src, tmp_path / "s2", size=32, progress=False)


def test_cli_prepare_info_verify(folder, tmp_path, capsys):
    out = tmp_path / "store"
    assert data_cli(["prepare", str(folder), str(out), "--size", "16", "--workers", "1", "--skip-bad",
                  "--no-progress"]) == 0
    assert "skipped 2" in capsys.readouterr().out
    assert data_cli(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "16x16" in text and "empty" in text and "corrupt.jpg" in text
    assert data_cli(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [16, 16, 3]
    assert data_cli(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    with open(out / "train-images.npy", "r+b") as f:  # flip one pixel byte
        f.seek(-1, 2)
        b = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(DataError, match="checksum"):
        data_cli(["verify", str(out)])
    assert data_cli(["prepare", "--help"]) == 0
    assert data_cli(["prepare", str(folder)]) == 2  # missing OUT: argparse usage error


def test_an_existing_folder_that_is_not_a_store_is_never_replaced(folder, tmp_path):
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="not a prepared store"):
        P.prepare(folder, mine, size=8, workers=1, skip_bad=True, progress=False)
    from phalanx.data.store import StoreWriter
    with pytest.raises(DataError, match="not a prepared store"):
        StoreWriter(mine, ["a"], (8, 8, 1), source="x")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_folder_with_another_manifest_json_is_not_a_store(folder, tmp_path):
    web = tmp_path / "site"
    web.mkdir()
    (web / MANIFEST).write_text('{"name": "my web app", "start_url": "/"}')
    assert not is_store(web) and P.detect_kind(web) is None
    with pytest.raises(DataError, match="not a prepared store"):
        P.prepare(folder, web, size=8, workers=1, skip_bad=True, progress=False)
    assert (web / MANIFEST).read_text().startswith('{"name"')
    assert P.detect_kind(P.prepare(folder, tmp_path / "store", size=8, workers=1, skip_bad=True,
                                   progress=False)) == "store"


def test_cli_errors_are_one_line_exit_1(tmp_path, capsys):
    from phalanx.commands import main
    assert main(["data", "prepare", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "src").mkdir()
    assert main(["data", "prepare", str(tmp_path / "src"), str(tmp_path / "src" / "store")]) == 1


@pytest.mark.parametrize("option,needle", [
    (["--size", "100000"], "--size 100000: a 100000x100000 image has more pixels than the decoder accepts in any "
                           "image (178,956,970); choose a side such as 64, 224 or 512"),
    (["--workers", "100000"], "--workers 100000: more decoding processes than this machine can run usefully (at "
                              "most {most}: 8 per usable core, within the open-file limit)"),
])
def test_an_absurd_size_or_worker_count_is_one_line_exit_2(folder, tmp_path, capsys, option, needle):
    from phalanx.commands import main
    from phalanx.runtime.cpu import max_processes
    out = tmp_path / "stores" / "out"
    assert main(["data", "prepare", str(folder), str(out), "--no-progress", *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle.format(most=max_processes()) in err, err
    assert not (tmp_path / "stores").exists()


@pytest.mark.parametrize("kind", ["imagefolder", "cifar10", "idx"])
def test_a_store_larger_than_the_free_disk_is_refused_naming_its_size(folder, tmp_path, capsys, monkeypatch, kind):
    from phalanx.commands import main
    from tests.conftest import make_idx_dataset
    src, option = {"imagefolder": (folder, ["--size", "300", "--channels", "3"]),
                   "cifar10": (tmp_path / "cifar", ["--size", "300"]), "idx": (tmp_path / "idx", [])}[kind]
    if kind == "cifar10":
        write_cifar(src, n=7)
    elif kind == "idx":
        make_idx_dataset(src, 64, 40)
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: shutil_usage(1_000_000))  # 1 MB free
    out = tmp_path / "stores" / "out"
    code = main(["data", "prepare", str(src), str(out), "--no-progress", "--workers", "1", "--skip-bad", *option])
    err = capsys.readouterr().err
    if kind == "idx":  # 104 images of 28x28: 82 kB fit
        assert code == 0 and is_store(out)
        return
    # the folder: 22 image files, one of 0 bytes (skipped before any decoding); CIFAR-10: 6 files of 7 records
    n = 21 if kind == "imagefolder" else 42
    assert code == 2 and err.count("\n") == 1, err
    assert (f"{out}: the store would take ~{n * (300 * 300 * 3 + 8) / 1e6:.3g} MB ({n} images of 300x300x3), "
            f"more than the 1 MB free on its disk; choose a smaller --size" in err), err
    assert not out.exists() and no_partials(out)


def shutil_usage(free: int):
    import shutil
    return shutil._ntuple_diskusage(10 * free, 9 * free, free)


def test_training_prepares_an_imagefolder_into_the_cache(tmp_path):
    from tests.conftest import run_phalanx
    rng = np.random.default_rng(4)
    src = tmp_path / "photos"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(22):
            im = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            im.save(src / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    r = run_phalanx(["train", "--data", src, "--epochs", "1", "--max_steps", "3", "--global_batch", "32",
                     "--model.name", "phalanx_cnn", "--model.width", "16", "--progress", "false",
                     "--out_dir", tmp_path / "runs", "--nproc", "1"], tmp_path / "cache", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert list((tmp_path / "runs").glob("*/model.safetensors"))
    stores = list((tmp_path / "cache" / "stores").glob("photos-imagefolder-*"))
    assert len(stores) == 1 and open_store(stores[0]).shape == (16, 16, 3)


def test_a_store_committed_meanwhile_with_the_same_images_is_kept(tmp_path):
    """Two nodes preparing into one shared cache: the second commit keeps the first store (ranks may
    have mapped it) when the images are the same, and replaces it when they differ."""
    from phalanx.data.store import StoreWriter
    out = tmp_path / "store"
    images = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8, 1)
    labels = np.array([0, 1, 0, 1])

    def write(imgs):
        w = StoreWriter(out, ["a", "b"], (8, 8, 1), source="x")
        w.add_split("train", imgs, labels)
        return w.commit()

    write(images)
    first = (out / "train-images.npy").stat().st_ino
    write(images)  # the same images committed again, as by a second node
    assert (out / "train-images.npy").stat().st_ino == first and no_partials(out)
    write(images[::-1].copy())  # other images: the new store replaces the old one
    assert (out / "train-images.npy").stat().st_ino != first and no_partials(out)
    assert np.array_equal(open_store(out)["train"].images, images[::-1])


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("phalanx: error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_source_inside_the_store_folder_is_refused_and_nothing_is_deleted(folder, tmp_path, capsys):
    """`phalanx data prepare STORE/imgs STORE` would replace STORE, and the images inside it with it."""
    import shutil

    from phalanx.commands import main
    store = tmp_path / "store"
    assert main(["data", "prepare", str(folder), str(store), "--size", "8", "--workers", "1", "--skip-bad",
                 "--no-progress"]) == 0
    shutil.copytree(folder, store / "imgs")
    capsys.readouterr()
    before = _tree(tmp_path)
    assert main(["data", "prepare", str(store / "imgs"), str(store), "--size", "8", "--no-progress"]) == 1
    line = _one_error_line(capsys)
    assert f"{store}: holds the source folder {store / 'imgs'}, and a store replaces what its folder holds" in line
    assert _tree(tmp_path) == before


def test_a_store_holding_a_file_of_the_users_is_not_replaced(folder, tmp_path, capsys):
    from phalanx.commands import main
    store = P.prepare(folder, tmp_path / "store", size=8, workers=1, skip_bad=True, progress=False)
    (store / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    assert main(["data", "prepare", str(folder), str(store), "--size", "12", "--skip-bad", "--no-progress"]) == 1
    assert "a prepared store that also holds 'notes.txt', which a new store would delete" in _one_error_line(capsys)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("case", ["read-only", "loop", "file", "proc"])
def test_an_output_that_cannot_be_written_is_one_line_exit_2(folder, tmp_path, capsys, monkeypatch, case):
    from phalanx.commands import main
    ro = tmp_path / "ro"
    ro.mkdir()
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "file").write_text("mine")
    real_access = os.access  # root may write anywhere: a read-only folder is simulated for other users
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro and real_access(p, mode))
    out, needle = {"read-only": (ro / "store", f"{ro} is read-only (no new files can be made in it)"),
                   "loop": (tmp_path / "loop" / "store", "loop is a symbolic link loop"),
                   "file": (tmp_path / "file" / "store", f"{tmp_path / 'file'} is a file, not a folder"),
                   "proc": (Path("/proc/self/store"), "in /proc")}[case]
    before = _tree(tmp_path)
    assert main(["data", "prepare", str(folder), str(out), "--no-progress"]) == 2
    assert needle in _one_error_line(capsys)
    assert _tree(tmp_path) == before


PLACES = ["a", "a/b", "a/b/c", "a/x", "alias", "alias/b", "alias/b/c", "d", "d/e"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PLACES), st.sampled_from(PLACES))
@example("a/b", "a")  # the source inside the output folder: `data prepare STORE/imgs STORE`
@example("alias/b", "a/b/c")  # the output inside the source, seen through a link
def test_a_store_is_refused_exactly_where_source_and_output_overlap(tmp_path, src, out):
    """Any two places of a tree with a link (`alias` -> `a`): the store is refused, before anything is read or
    written, exactly when one of source and output is or lies inside the other (after the link)."""
    for d in ("a/b/c", "a/x", "d/e"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    if not (tmp_path / "alias").is_symlink():
        (tmp_path / "alias").symlink_to("a")
    s, o = tmp_path / src, tmp_path / out
    overlap = any(x == y or y in x.parents for x, y in ((s.resolve(), o.resolve()), (o.resolve(), s.resolve())))
    try:
        P._check_out(s, o)
        why = ""
    except DataError as e:
        why = str(e)
        assert "\n" not in why and why.startswith(f"{o}: "), why
    # refused for the overlap (or else only as a folder that is not a store: `d`, `a`... hold folders)
    assert ("source folder" in why) == overlap, why
    assert why == "" or overlap or "exists and is not a prepared store" in why
