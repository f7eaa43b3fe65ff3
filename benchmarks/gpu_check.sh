#!/usr/bin/env bash
# GPU check: on a CUDA machine, run the default recipe and the loader benchmark; print time to 94%
# and img/s. Prepared to run in one go inside a short device lease:
#   bash benchmarks/gpu_check.sh            (needs torch with CUDA; installs Phalanx into the current env)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps -e . 2>/dev/null || python3 -m pip install -q -e .
python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, "bf16", torch.cuda.is_bf16_supported())
PY
export PHALANX_CACHE=${PHALANX_CACHE:-/tmp/phalanx-cache}
DATA=${DATA:-fashion_mnist}
python3 -m phalanx train --data "$DATA" --nproc auto --epochs ${EPOCHS:-12} --progress false \
  --run_dir /tmp/gpu-run --ckpt.at_epoch_end false "$@"
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/gpu-run/metrics.jsonl")]
ev = [r for r in rows if r["event"] == "eval"]
hit = next((r for r in ev if r["acc"] >= 0.94), None)
print(json.dumps({"time_to_94_s": hit["wall_s"] if hit else None, "final_acc": ev[-1]["acc"],
                  "train_img_s": max(r["train_img_s"] for r in ev)}))
PY
python3 benchmarks/loader.py --quick || true
