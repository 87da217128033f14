#!/usr/bin/env bash
# The one place for GPU checks: everything loraforge claims on a CUDA GPU, in under 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh            # from the repository root, with the venv built (make install)
#   bash bench/gpu_check.sh tests big  # some sections: tests small small-matched big big-matched qlora
#
# 1. the CUDA-marked tests (tests/test_cuda.py): golden losses, a PEFT round trip and the decode engine on the GPU;
# 2. training tokens/s and peak GPU memory against PEFT + transformers Trainer on the same GPU, same config:
#    a. the default model (SmolLM2-135M); where its GGUF is not installed, its architecture with random weights,
#       built from ARCH (a folder with its config.json and tokenizer): speed and memory depend on shapes only;
#    b. a 1B-class Llama built from random weights (no bigger model is on disk).
# 3. QLoRA: training on the default model (or its shape) with the base packed as nf4 / nf4-dq against plain LoRA;
#    its CUDA tests (golden NF4 losses, the packed layer, decoding on a packed base) are in section 1.
# Later capabilities (serving) add their GPU checks here.
#
# Environment: PY (the python; default .venv/bin/python, else python3), ARCH (see 2a), ALPACA (the alpaca_zh_en
# folder; default ../shared/data/alpaca_zh_en). Every section runs; the script fails at the end if any failed.
#
# On a machine lent by the `device` tool (no default model, no ../shared, 64 MiB carried), prepare here first:
#   mkdir -p .gpu/arch .gpu/alpaca && echo /.gpu/ >> .git/info/exclude
#   cp "$(python -c 'from loraforge.models import *; print(resolve_model(DEFAULT_MODEL))')"/{config.json,tokenizer*,chat_template.jinja,generation_config.json} .gpu/arch/
#   cp ../shared/data/alpaca_zh_en/alpaca_chinese_part_{0,1}.json .gpu/alpaca/
# then run, carrying .gpu:  ARCH=.gpu/arch ALPACA=.gpu/alpaca PY=python3 bash bench/gpu_check.sh
set -uo pipefail
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
ALPACA=${ALPACA:-../shared/data/alpaca_zh_en}
WORK=$(mktemp -d)
FAILED=()
section() { echo; echo "== $1"; }
check() { "$@" || FAILED+=("$*"); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"

want() { [ ${#SECTIONS[@]} -eq 0 ] || [[ " ${SECTIONS[*]} " == *" $1 "* ]]; }
SECTIONS=("$@")

if want tests; then
    section "1. CUDA tests"
    check $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
fi

# The default model, or its architecture with random weights
if $PY -c "from loraforge.models import DEFAULT_MODEL, resolve_model; resolve_model(DEFAULT_MODEL)" 2>/dev/null; then
    SMALL=""
else
    SMALL=$WORK/smollm2-135m-random
    if want small || want small-matched || want big || want big-matched; then
        check $PY bench/random_model.py --like "${ARCH:?the default model is not installed: set ARCH to a folder with its config.json and tokenizer}" --output "$SMALL"
    fi
fi
SMALL_ARGS=(--device cuda --alpaca "$ALPACA" --steps 30 --batch-size 16 --max-length 512 --warmup 3 ${SMALL:+--model "$SMALL" --no-eval})
# loraforge packs 16 rows of 512 tokens (~8,050 real tokens a step); PEFT pads each example (~106 real tokens on
# average): 76 examples a step give it the same real tokens, and Trainer's length grouping keeps its padding low.
if want small; then
    section "2a. training tokens/s and peak GPU memory vs PEFT + Trainer: the default model, the same batch"
    check $PY bench/train_throughput.py "${SMALL_ARGS[@]}"
fi
if want small-matched; then
    section "2a'. the same, PEFT given as many real tokens a step (76 examples, length-grouped)"
    check $PY bench/train_throughput.py "${SMALL_ARGS[@]}" --targets all-linear --peft-batch-size 76 \
        --peft-sampling group_by_length
fi

BIG=$WORK/llama-1b
if want big || want big-matched; then
    section "2b. a 1B-class Llama (random weights, the default model's tokenizer)"
    check $PY bench/random_model.py --size 1b ${ARCH:+--like "$ARCH"} ${SMALL:+--like "$SMALL"} --output "$BIG"
fi
BIG_ARGS=(--device cuda --alpaca "$ALPACA" --model "$BIG" --no-eval --steps 20 --batch-size 8 --max-length 512
          --targets all-linear --warmup 3)
if want big; then
    section "2b. the 1B model, the same batch"
    check $PY bench/train_throughput.py "${BIG_ARGS[@]}"
fi
if want big-matched; then
    section "2b'. the 1B model, PEFT given as many real tokens a step (38 examples, length-grouped)"
    check $PY bench/train_throughput.py "${BIG_ARGS[@]}" --peft-batch-size 38 --peft-sampling group_by_length
fi

if want qlora; then
    section "3. QLoRA on the GPU: LoRA vs the base packed as nf4 / nf4-dq, same steps (tokens/s, peak GPU memory)"
    check $PY -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from train_throughput import write_alpaca; write_alpaca(Path('$WORK'), Path('$ALPACA'))"
    for Q in none nf4 nf4-dq; do
        check $PY -m loraforge train --model "${SMALL:-smollm2-135m-instruct}" --device cuda --dtype bfloat16 \
            --data "$WORK/train.jsonl" --quantize $Q --target-modules all-linear --max-steps 20 --batch-size 16 \
            --max-length 512 --output "$WORK/qlora-$Q" --quiet
        check $PY -c "import json,sys; s=json.load(open('$WORK/qlora-$Q/train_summary.json')); print('$Q', 'tok/s', s['tokens_per_second'], 'peak GPU MB', s['peak_memory_mb'], 'final loss', round(s['final_loss'], 4))"
    done
fi

rm -rf "$WORK"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo; echo "FAILED:"; printf '  %s\n' "${FAILED[@]}"; exit 1
fi
echo; echo "gpu_check: all sections passed"
