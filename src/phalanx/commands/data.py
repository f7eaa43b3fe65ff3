"""`phalanx data prepare|info|verify|shard`: build, inspect and check prepared stores (data/prepare.py,
data/store.py), and write tar shards for streaming (data/shard_write.py)."""
from __future__ import annotations

import json
from pathlib import Path

from phalanx.commands.args import Command, Option, Parsed, Spec, run_group
from phalanx.data.prepare import DEFAULT_SIZE, prepare, summary
from phalanx.data.shard_write import parse_bytes, write_shards
from phalanx.data.shard_write import summary as shard_summary
from phalanx.data.store import open_store


def prepare_store(p: Parsed) -> int:
    v = p.values
    out = prepare(Path(p.positional[0]), Path(p.positional[1]), size=v.size, channels=v.channels, workers=v.workers,
                  skip_bad=v.skip_bad, progress=not v.no_progress)
    store = open_store(out)
    splits = ", ".join(f"{n} {len(s):,d}" for n, s in store.splits.items())
    h, w, c = store.shape
    skipped = len(store.manifest.get("skipped", []))
    print(f"phalanx: store {out}: {splits} images of {h}x{w}x{c}, {len(store.classes)} classes"
          + (f"; skipped {skipped} unreadable file(s), listed by `phalanx data info {out}`" if skipped else ""))
    return 0


def info(p: Parsed) -> int:
    store = open_store(Path(p.positional[0]))
    print(json.dumps(store.manifest, indent=1) if p.values.json else summary(store.manifest, store.path))
    return 0


def verify(p: Parsed) -> int:
    store = open_store(Path(p.positional[0]))
    store.verify()
    n = sum(len(s) for s in store.splits.values())
    print(f"phalanx: {store.path}: OK, {2 * len(store.splits)} files ({n:,d} images) match their checksums")
    return 0


def shard(p: Parsed) -> int:
    v = p.values
    out = Path(p.positional[1])
    index = write_shards(Path(p.positional[0]), out, parse_bytes(v.shard_size, "--shard_size"), size=v.size,
                         channels=v.channels, progress=not v.no_progress)
    print(shard_summary(index, str(out)))
    return 0


PREPARE = Spec("phalanx data prepare SRC OUT [--size N] [--channels 1|3] [--workers N] [--skip-bad] [--no-progress]",
               """Convert idx files, CIFAR binaries or an ImageFolder at SRC into a prepared store at OUT.

SRC is one of:
  a folder of MNIST/Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...)
  CIFAR-10/100 binary version (data_batch_1.bin ... test_batch.bin, or train.bin + test.bin,
    or the folder holding cifar-10-batches-bin/); the python (pickle) version is refused
  an ImageFolder: SRC/<class>/**/<image>; or SRC/train/<class>/... with SRC/val/ or SRC/test/.
    Without split folders a stratified 10% test split is held out (deterministic).
    JPEG, PNG, BMP, GIF, WebP, TIFF, PPM; any size and mode; other files are ignored.

Images are resized (shorter side to --size, bilinear, antialias) and centre-cropped.
Re-running with the same source and options returns the existing store; an interrupted
prepare leaves no store behind. OUT is created (replaced if it holds another store).""",
               options=(Option("size", "side of the square images (0: the images' own size if they all share one "
                               f"square size, else {DEFAULT_SIZE}; CIFAR: 32)", int, 0, minimum=0),
                        Option("channels", "1 = grayscale, 3 = RGB (0: 1 if every image is grayscale, else 3)", int, 0,
                               choices=(0, 1, 3)),
                        Option("workers", "decoding processes (0: one per CPU)", int, 0, minimum=0),
                        Option("skip-bad", "leave out unreadable or corrupt files and list them in the manifest "
                               "(default: stop and list every one of them)", flag=True),
                        Option("no-progress", "no progress bar", flag=True)),
               positionals=(2, 2), paths=True,
               epilog="example: phalanx data prepare ~/photos ~/stores/photos-64 --size 64 --skip-bad")
INFO = Spec("phalanx data info STORE [--json]", "Print what a prepared store holds: source, shape, classes, split "
            "sizes, mean/std, skipped files.", options=(Option("json", "print the whole manifest as JSON", flag=True),),
            positionals=(1, 1), paths=True)
VERIFY = Spec("phalanx data verify STORE", "Recompute the SHA-256 of every array file and compare with the manifest.",
              positionals=(1, 1), paths=True)

SHARD = Spec("phalanx data shard SRC OUT [--shard_size 256MB] [--size N] [--channels 1|3] [--no-progress]",
             """Write the ImageFolder at SRC as tar shards in WebDataset's layout into OUT, plus OUT/index.json.

Each image is KEY.jpg (or .png, or its own format) with its encoded bytes as they are, and KEY.cls its
class number; KEY is the image's number in its split as `phalanx data prepare` orders it. With --size
each image is decoded, resized and centre-cropped as `phalanx data prepare --size` does and stored as PNG.
Training images are spread over train-000000.tar, ... in a fixed shuffled order; the test (or val)
split goes into test-000000.tar, ... beside them. index.json lists each shard's samples, labels, byte
size and SHA-256. Upload OUT as it is (e.g. `aws s3 cp --recursive`) and train with
`phalanx train --data s3://BUCKET/PREFIX --data.size N`. OUT must be new, empty, or a shard folder.""",
             options=(Option("shard_size", "largest size of a shard (256MB, 1GB, 64MiB...)", str, "256MB"),
                      Option("size", "re-encode every image as PNG at this side (0: keep the files' bytes)", int, 0,
                             minimum=0),
                      Option("channels", "with --size: 1 = grayscale, 3 = RGB (0: 3)", int, 0, choices=(0, 1, 3)),
                      Option("no-progress", "no progress line", flag=True)),
             positionals=(2, 2), paths=True,
             epilog="example: phalanx data shard ~/photos ~/shards/photos --shard_size 256MB")

SUBCOMMANDS = {"prepare": Command(PREPARE, prepare_store), "info": Command(INFO, info),
               "verify": Command(VERIFY, verify), "shard": Command(SHARD, shard)}


def data(argv: list[str]) -> int:
    return run_group("data", "Build and inspect prepared stores: decoded uint8 images in memory-mapped files plus a "
                     "JSON manifest, read directly by `phalanx train --data STORE`; or write tar shards that "
                     "`phalanx train --data URL` streams.", SUBCOMMANDS, argv)


COMMANDS = {"data": data}
