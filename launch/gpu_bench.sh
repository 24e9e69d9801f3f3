#!/usr/bin/env bash
# GPU figures for docs/benchmarks.md from one command (issue #21): the GPU tests, our bf16
# step against transformers PyTorch (bf16 autocast, SDPA) for BERT-base at length 128 and
# 512 and ELECTRA-base at 128, with the preset's attention dropout and with cuDNN fused
# attention, and a jax.profiler summary of BERT-base at 128. See docs/gpu.md.
#
#   bash launch/gpu_bench.sh OUT_DIR [tests] [bench] [profile]   # default: all, in order
#   TOY=1 bash launch/gpu_bench.sh OUT_DIR   # the same commands at bert,tiny / electra,tiny,
#                                             # batch 4 (2 at 512), 2 steps, on the CPU
#
# Writes under OUT_DIR: gpu_bench.log (all output), env.txt, pytest_gpu.xml, bench_*.json,
# table.md (launch.bench_table), profile_bert_s128.{json,txt}, status.txt (each stage's
# exit code and seconds). A failing stage is recorded and the next one still runs.
#
# Written for (not yet run on): one NVIDIA H200 (~139 GiB), 16 cores, no network; python3
# 3.12 with jax 0.11.2 (CUDA 13 plugin), flax, optax, orbax-checkpoint, sentencepiece,
# transformers, tokenizers, safetensors, matplotlib, tqdm, torch 2.11. What it lacks
# (grain, ml-collections, tensorboardX, pytest, ...) travels as wheels in the git-ignored
# .whl/ folder, installed here into /tmp/site without network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash launch/gpu_bench.sh OUT_DIR [tests] [bench] [profile]}"
shift
STAGES="${*:-tests bench profile}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"

main() {
if [ -n "${TOY:-}" ]; then
  # The GPU commands at CI size on the CPU: checks this script, not the numbers.
  BERT=bert,tiny ELECTRA=electra,tiny B128=4 B512=2 STEPS=2 WARMUP=1 ROUND=1 FUSED=xla
  PROFILE_STEPS=2 LIMIT=1800
  export JAX_PLATFORMS=cpu
else
  BERT=bert,base ELECTRA=electra,base B128=256 B512=64 STEPS=30 WARMUP=3 ROUND=5 FUSED=cudnn
  PROFILE_STEPS=5 LIMIT=420
  # Fail loudly if the CUDA plugin does not load, instead of timing the CPU.
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "== installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}" HF_HUB_OFFLINE=1

{
  echo "date: $(date -u +%FT%TZ)  toy: ${TOY:-0}  stages: $STAGES" \
       "git: $(git rev-parse --short HEAD 2>/dev/null)"
  echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p') x $(nproc)"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
      --format=csv,noheader
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version())
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
             "orbax-checkpoint", "grain", "ml-collections", "tensorboardX", "sentencepiece",
             "torch", "transformers", "pytest"):
  try:
    print(f"{name} {md.version(name)}")
  except md.PackageNotFoundError:
    print(f"{name} -")
# Everything the stages import, at once: a missing wheel fails here, before any compute.
missing = []
for mod in ("pytest", "torch", "transformers", "bert_jax.train", "bert_jax.finetune.loop",
            "launch.benchmark", "launch.profile_summary", "launch.bench_table"):
  try:
    __import__(mod)
  except ImportError as e:
    missing.append(f"{mod}: {e}")
import jax
print("jax backend", jax.default_backend(), jax.devices())
import torch
print("torch cuda", torch.cuda.is_available(), torch.version.cuda)
if missing:
  sys.exit("missing modules (add their wheels to .whl/, see docs/gpu.md):\n  "
           + "\n  ".join(missing))
EOF
} 2>&1 | tee "$OUT/env.txt"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  echo "preflight failed: see $OUT/env.txt"; return 2
fi

FAILED=0
stage() {  # stage NAME COMMAND...: run it under the time limit, record rc and seconds
  local name="$1" t0=$SECONDS rc
  shift
  echo "== $name: $*"
  timeout "$LIMIT" "$@"
  rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/status.txt"
  [ "$rc" -eq 0 ] || FAILED=1
}

bench() {  # bench NAME PRESET SEQ BATCH [overrides...]: ours vs PyTorch, bf16
  local name="$1" preset="$2" seq="$3" batch="$4"
  shift 4
  local objectives=mlm:1.0
  if [[ "$preset" == electra* ]]; then objectives=rtd:1.0; fi
  stage "bench_$name" "$PY" -m launch.benchmark --config "configs/pretrain.py:$preset" \
      --peer hf --objectives "$objectives" --seq_len "$seq" --batch_size "$batch" \
      --steps "$STEPS" --warmup "$WARMUP" --round_steps "$ROUND" \
      --config.model.dtype=bfloat16 "$@" --out "$OUT/bench_$name.json"
}

# The fused kernel has no dropout on probabilities: its rows set attention dropout 0 (the
# PyTorch peer gets the same config); "preset" rows keep 0.1 (explicit attention here).
NODROP=(--config.model.attention_impl="$FUSED" --config.model.attention_dropout=0.0)

for s in $STAGES; do
  case "$s" in
    tests)
      stage tests "$PY" -m pytest tests/test_gpu.py -m gpu -p no:xdist -q -rs \
          -o cache_dir=/tmp/bert_jax_pytest_cache --junitxml="$OUT/pytest_gpu.xml" ;;
    bench)
      bench bert_s128_preset "$BERT" 128 "$B128"
      bench bert_s128_cudnn "$BERT" 128 "$B128" "${NODROP[@]}"
      bench bert_s512_preset "$BERT" 512 "$B512"
      bench bert_s512_cudnn "$BERT" 512 "$B512" "${NODROP[@]}"
      bench electra_s128_cudnn "$ELECTRA" 128 "$B128" "${NODROP[@]}"
      compgen -G "$OUT/bench_*.json" > /dev/null && \
          "$PY" -m launch.bench_table "$OUT"/bench_*.json | tee "$OUT/table.md" ;;
    profile)
      stage profile_bert_s128 "$PY" -m launch.profile_summary \
          --config "configs/pretrain.py:$BERT" --config.objectives=mlm:1.0 --seq_len 128 \
          --batch_size "$B128" --warmup "$WARMUP" --steps "$PROFILE_STEPS" \
          --config.model.dtype=bfloat16 "${NODROP[@]}" --out "$OUT/profile_bert_s128.json" ;;
    *) echo "unknown stage $s (tests, bench, profile)"; FAILED=1 ;;
  esac
done
echo "== done: $(tr '\n' ' ' < "$OUT/status.txt")"
return "$FAILED"
}

main 2>&1 | tee -a "$OUT/gpu_bench.log"
exit "${PIPESTATUS[0]}"
