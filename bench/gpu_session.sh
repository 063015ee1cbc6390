#!/usr/bin/env bash
# The prepared device session of #24 (under 8 minutes on one H100/H200): bench/gpu.py on dapo's real path,
# then the Qwen2.5-0.5B-shaped run (bench/realshape.py) on CUDA in bf16. Logs and JSON lines go to OUT.
#
#   bash bench/gpu_session.sh OUT            # on the GPU machine
#   bash bench/gpu_session.sh OUT --smoke    # here, on CPU: the same steps with toy shapes (checks the script)
#
# The device machine has torch and transformers but none of dapo's other dependencies: carry their wheels
# (.whl, see the device tool's README) and install them first, e.g.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
OUT=${1:?usage: bench/gpu_session.sh OUT [--smoke]}
SMOKE=${2:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/env.txt"
if [ "$SMOKE" = "--smoke" ]; then
  timeout 300 $PY bench/gpu.py --smoke > "$OUT/gpu.txt" 2> "$OUT/gpu.log"
  timeout 600 $PY bench/realshape.py --out "$OUT/rs" --smoke --steps 1 > "$OUT/realshape.txt" 2> "$OUT/realshape.log"
else
  # bench/gpu.py: rollout at 64-512 rows x 512 tokens, one 8192-token rollout, updates with head TF32 off/on
  timeout 240 $PY bench/gpu.py > "$OUT/gpu.txt" 2> "$OUT/gpu.log"
  # two DAPO steps of the 0.5B shape in bf16 on one GPU (the default sampler, float32 masters)
  timeout 200 $PY bench/realshape.py --out "$OUT/rs" --dtype bfloat16 --steps 2 -- model.device=cuda \
    > "$OUT/realshape.txt" 2> "$OUT/realshape.log"
fi
tail -n 1 "$OUT/gpu.txt" > "$OUT/gpu.json"
tail -n 1 "$OUT/realshape.txt" > "$OUT/realshape.json"
echo "done: $OUT"
