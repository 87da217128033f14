#!/usr/bin/env bash
# The quality table of bench/RESULTS.md, rerun from a fresh clone: each row trains with its example config, is
# scored on the dev split (never the official test split) and timed; bench/quality_table.py then writes the table
# between the quality markers of bench/RESULTS.md.
#
#   make install && . .venv/bin/activate && bash bench/quality.sh [ROW ...]   # from the repo root
#
# Rows: conll_minilm, cuad, scitldr, sst2_minilm, sst2, conll, sst2_fewshot, conll_fewshot (all by default). Run
# it on an otherwise idle machine: the wall times are part of the table.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data
OUT=runs/quality
mkdir -p "$OUT"
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(conll_minilm cuad scitldr sst2_minilm sst2 conll sst2_fewshot conll_fewshot)

timed() {  # timed ROW COMMAND...: run it, keep its wall seconds and the command for the table
    local row=$1; shift
    local start=$SECONDS
    "$@"
    echo $((SECONDS - start)) >> "$OUT/$row.seconds"
    printf '%s\n' "$*" >> "$OUT/$row.commands"
}

for row in "${ROWS[@]}"; do
    rm -f "$OUT/$row.seconds" "$OUT/$row.commands"
    case $row in
    conll_minilm)  # entity F1 on the whole dev split (eng.testa), read from the training's validation
        timed $row loraforge train examples/conll2003_minilm.yaml --output $OUT/conll_minilm --overwrite ;;
    cuad)  # held-out contract perplexity, base against the adapter
        [ -d runs/data/legal_cuad ] || python examples/prepare_data.py
        timed $row loraforge train examples/legal_cuad.yaml --output $OUT/cuad --overwrite
        timed $row loraforge eval --recipe lm --data runs/data/legal_cuad/heldout --max-length 512 \
            --adapter $OUT/cuad --output $OUT/cuad-report ;;
    scitldr)  # ROUGE-L of the TL;DRs generated for the whole dev split (619 papers), base against the adapter
        timed $row loraforge train examples/scitldr.yaml --output $OUT/scitldr --overwrite
        timed $row loraforge eval --data $DATA/scitldr/dev.jsonl --adapter $OUT/scitldr --batch-size 16 \
            --output $OUT/scitldr-report ;;
    sst2_minilm)  # accuracy on the whole dev split (872), read from the training's validation (of the 6, the one
        # at the best validation loss: the adapter kept)
        timed $row loraforge train examples/sst2_minilm.yaml --output $OUT/sst2_minilm --overwrite ;;
    sst2)  # accuracy on the whole dev split (872), each label's words scored (not generated)
        timed $row loraforge train examples/sst2.yaml --output $OUT/sst2 --overwrite
        timed $row loraforge eval --data $DATA/sst2/dev.tsv --recipe sst2 --answer label-words --adapter $OUT/sst2 \
            --base false --dtype auto --batch-size 32 --output $OUT/sst2-report ;;
    conll)  # entity F1 of the generated entity lists on the whole dev split (eng.testa, 3,250 sentences)
        [ -d runs/data/conll2003 ] || python examples/prepare_data.py
        timed $row loraforge train examples/conll2003.yaml --output $OUT/conll --overwrite
        timed $row loraforge eval --data $DATA/conll2003/eng.testa --file-format conll --recipe conll2003 \
            --adapter $OUT/conll --base false --dtype auto --batch-size 32 --output $OUT/conll-report ;;
    sst2_fewshot)  # 32 examples, three seeded draws: LoRA on them against the same 32 in context (bench/fewshot.py)
        timed $row python bench/fewshot.py --task sst2 --output $OUT/sst2_fewshot ;;
    conll_fewshot)  # the same for NER as generation, scored on the 200-sentence dev sample
        [ -d runs/data/conll2003 ] || python examples/prepare_data.py
        timed $row python bench/fewshot.py --task conll2003 --output $OUT/conll2003_fewshot ;;
    *) echo "unknown row $row (rows: conll_minilm cuad scitldr sst2_minilm sst2 conll sst2_fewshot conll_fewshot)" >&2
       exit 2 ;;
    esac
done
python bench/quality_table.py "$OUT" bench/RESULTS.md
