#!/usr/bin/env bash
# The CUAD and SST-2 runs recorded in bench/RESULTS.md, one after the other (~60 min on an idle 2-core CPU).
#
#   make install && . .venv/bin/activate && bash bench/task_runs.sh        # from the repo root
#
# Each `loraforge eval` writes results.json, predictions.jsonl, report.md and a self-contained report.html.
# Only train and dev splits are read; the official test splits stay held out.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data

python examples/prepare_data.py  # held-out CUAD contracts, PubMedQA/E2E/CoNLL dev samples under runs/data/

# CUAD: continued pre-training on 98 contracts; perplexity on 3 contracts it never saw, base against adapter.
loraforge train examples/legal_cuad.yaml
loraforge eval --recipe lm --data runs/data/legal_cuad/heldout --max-length 512 \
    --adapter runs/legal_cuad --output runs/report-cuad

# SST-2 with SmolLM2-135M-Instruct (the label generated as a word): LoRA on the train split and on 32 examples,
# against the base model zero-shot and with 32 in-context examples, on the whole dev split (872), in one table.
loraforge train examples/sst2.yaml
loraforge train examples/sst2_fewshot32.yaml
loraforge eval --recipe sst2 --data $DATA/sst2/dev.tsv --adapter runs/sst2 --adapter runs/sst2_fewshot32 \
    --few-shot 32 --few-shot-data $DATA/sst2/train.tsv --dtype bfloat16 --output runs/report-sst2

# SST-2 with MiniLM-L6 (an encoder: LoRA + a classifier head), on the train split and on 32 examples.
# No in-context baseline exists for an encoder; its untrained head is chance.
loraforge train examples/sst2_minilm.yaml
loraforge train examples/sst2_minilm.yaml --max-examples 32 --max-steps 60 --eval-every 10 --output runs/sst2_minilm32
for run in sst2_minilm sst2_minilm32; do
    loraforge predict --adapter runs/$run --data $DATA/sst2/dev.tsv --output runs/$run/dev_predictions.jsonl
done
