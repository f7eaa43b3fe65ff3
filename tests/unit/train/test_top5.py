"""Top-1 and top-5 counts of `evaluate` on hand-made logits: integers, whatever the chunking."""
import numpy as np
import pytest
import torch

from phalanx.data.augment import Normalize
from phalanx.data.loader import SplitOnDevice
from phalanx.data.store import Split
from phalanx.train.evaluate import evaluate


class LogitsByIndex(torch.nn.Module):
    """Returns row i of a fixed table for the image whose pixels all hold i (so the logits are hand-made)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].round().long()]


def _logits_with_label_at_rank(labels: list[int], ranks: list[int], classes: int) -> torch.Tensor:
    """Row i: distinct logits where labels[i] is the ranks[i]-th largest (0 = the argmax)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for y, r in zip(labels, ranks):
        order = [c for c in torch.randperm(classes, generator=g).tolist() if c != y]
        order.insert(r, y)  # order[k] gets the k-th largest logit
        row = torch.empty(classes)
        row[torch.tensor(order)] = torch.linspace(5.0, -5.0, classes)
        rows.append(row)
    return torch.stack(rows)


def _split(n: int, labels: list[int]) -> SplitOnDevice:
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1)).copy()
    return SplitOnDevice(Split(images, np.asarray(labels, dtype=np.int64)), torch.device("cpu"), resident=False)


def _identity_normalize() -> Normalize:
    return Normalize([0.0], [1.0 / 255.0], torch.device("cpu"), False)  # pixel value i -> float i


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_top1_and_top5_count_the_hand_made_ranks_in_any_chunking(chunk):
    # 8 images with the label first, 6 with it third (top-5 only), 5 with it fifth (top-5 only, the edge),
    # 4 with it sixth and 2 with it last (neither).
    ranks = [0] * 8 + [2] * 6 + [4] * 5 + [5] * 4 + [9] * 2
    n = len(ranks)
    labels = [i % 10 for i in range(n)]
    model = LogitsByIndex(_logits_with_label_at_rank(labels, ranks, 10))
    res = evaluate(model, _split(n, labels), _identity_normalize(), chunk, world=1, rank=0)
    assert (res["correct"], res["correct_top5"], res["count"]) == (8, 19, 25)
    assert res["acc"] == 8 / 25 and res["top5"] == 19 / 25


def test_five_classes_or_fewer_report_no_top5():
    labels = [0, 1, 2, 3, 4, 0]
    model = LogitsByIndex(_logits_with_label_at_rank(labels, [4, 0, 1, 0, 3, 2], 5))
    res = evaluate(model, _split(6, labels), _identity_normalize(), 4, world=1, rank=0)
    assert res["correct"] == 2 and "top5" not in res and "correct_top5" not in res
