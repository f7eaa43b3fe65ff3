"""--data.stream across ranks: two streaming ranks train like one rank reading the prepared store."""
import json

import pytest
import torch

from tests.dist.test_data_parallel import train, weights
from tests.unit.data.test_stream_training import make_jpeg_folder

pytestmark = [pytest.mark.dist, pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]


def test_two_streaming_ranks_match_one_prepared_rank(cache_dir, tmp_path):
    folder = make_jpeg_folder(tmp_path / "imgs")
    # GroupNorm + GELU: the per-rank batch split changes no maths (see test_data_parallel).
    common = ("--data.size", "16", "--model.norm", "group", "--model.act", "gelu", "--log_samples", "true")
    r1, prepared = train(cache_dir, folder, tmp_path, 1, *common, steps=4, batch=8)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2, streamed = train(cache_dir, folder, tmp_path, 2, *common, "--data.stream", "true",
                         "--data.stream_workers", "1", steps=4, batch=8)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert json.loads((streamed / "summary.json").read_text())["world"] == 2
    one = [json.loads(line) for line in (prepared / "logs" / "samples-rank-0.jsonl").read_text().splitlines()]
    parts = [[json.loads(line) for line in (streamed / "logs" / f"samples-rank-{k}.jsonl").read_text().splitlines()]
             for k in (0, 1)]
    assert [r["idx"] for r in one] == [a["idx"] + b["idx"] for a, b in zip(*parts)]  # rank 0 | rank 1 halves
    wp, ws = weights(prepared), weights(streamed)
    for k in wp:
        torch.testing.assert_close(ws[k], wp[k], rtol=1e-5, atol=1e-6, msg=k)
