"""ImageFolder trees with symbolic links: a link may not make images count again or under another class."""
import os

import numpy as np
import pytest
from PIL import Image

from phalanx.data import prepare as P
from phalanx.errors import DataError

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")


def _tree(root):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c / "sub").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{c}{i}.png")
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / "sub" / f"{c}s.png")
    return root


@pytest.mark.parametrize("target", ["..", "../dog", ".", "../..", "/"])
def test_a_link_out_of_the_class_folder_is_refused_naming_it(tmp_path, target):
    root = _tree(tmp_path / "src")
    link = root / "cat" / "more"
    os.symlink(target, link)
    with pytest.raises(DataError) as e:
        P.list_imagefolder(root)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{link}: a link to ") and "would count again" in msg


def test_a_link_to_a_folder_outside_the_tree_is_refused(tmp_path):
    root = _tree(tmp_path / "src")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "dog" / "extra")
    with pytest.raises(DataError, match=r"extra: a link to a folder outside it"):
        P.list_imagefolder(root)


def test_a_link_to_an_ancestor_deep_inside_is_refused(tmp_path):
    root = _tree(tmp_path / "src")
    os.symlink("../..", root / "cat" / "sub" / "up")  # -> root: every class again
    with pytest.raises(DataError, match=r"up: a link to the class folder itself or a folder above it"):
        P.list_imagefolder(root)


def test_links_inside_the_class_folder_and_linked_class_folders_still_count_once(tmp_path):
    root = _tree(tmp_path / "src")
    os.symlink("sub", root / "cat" / "alias")  # the same folder twice: its image counts once
    (tmp_path / "owls").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "owls" / "o.png")
    os.symlink(tmp_path / "owls", root / "owl")  # a class folder that is itself a link: followed
    listing = P.list_imagefolder(root, held_out=0)
    files = sorted(rel for rel, _ in listing.splits["train"])
    assert listing.classes == ["cat", "dog", "owl"]
    assert sum(os.path.basename(f) == "cats.png" for f in files) == 1
    assert len(files) == 4 + 4 + 1
