#!/usr/bin/env bash
# Fine-tune Gemma 3 270M (the embedded base model, no download) into a tool-calling model: LoRA adapters on
# every linear layer, trained on {"messages", "tools"} records (generate_data.py writes them), the loss on the
# assistant's calls and answers only. Prints the directory of the adapter, the run's last checkpoint, which
# `evaluate.py TEST.jsonl --lora DIR` and `gemma3 serve --lora DIR` take.
#
#   examples/tool_calling/train.sh data/train.jsonl runs/tools [more gemma3 train flags]
#
# Time: 19 min 23 s for 400 generated records (one epoch, 135 steps) on two cores of an AMD EPYC (README.md).
# Every setting can be changed from the environment: EPOCHS=3 LR=1e-4 train.sh ...; MODEL=SOURCE starts from
# other weights (a .gguf, a checkpoint or a Hub id) instead of the embedded model; flags after OUT_DIR go to
# `gemma3 train` as they are (docs/training.md).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 TRAIN.jsonl OUT_DIR [gemma3 train flags...]" >&2
  exit 2
fi
TRAIN=$1
OUT=$2
shift 2

# Rows of 2 048 tokens, or longer when a conversation is (a record with many tools declared): conversations are
# packed whole, and the trainer refuses one longer than --seq-len.
if [ -z "${SEQ_LEN:-}" ]; then
  SEQ_LEN=$(python - "$TRAIN" "${MODEL:-}" <<'PY'
import sys
from gemma3.train.data import read_documents, tokenize_document
from gemma3.train.trainer import tokenizer_for_run

try:
    tokenizer = tokenizer_for_run(sys.argv[2] or None)
    longest = max(len(tokenize_document(doc, tokenizer)[0]) for doc in read_documents([sys.argv[1]]))
except Exception:  # unreadable data: gemma3 train says what is wrong, in one line
    longest = 0
print(max(2048, -(-longest // 256) * 256))
PY
)
fi

python -m gemma3 train "$TRAIN" -o "$OUT" ${MODEL:+-m "$MODEL"} \
  --lora --lora-r "${LORA_R:-16}" --lora-alpha "${LORA_ALPHA:-32}" --lora-targets "${LORA_TARGETS:-all-linear}" \
  --seq-len "$SEQ_LEN" --epochs "${EPOCHS:-1}" -b "${BATCH:-1}" --lr "${LR:-4e-4}" \
  --warmup-steps "${WARMUP:-10}" --val-fraction "${VAL_FRACTION:-0.03}" --eval-every "${EVAL_EVERY:-50}" \
  --eval-batches "${EVAL_BATCHES:-4}" --sample-every 0 \
  --save-every 0 --keep 1 \
  "$@"

# the trainer names its newest complete checkpoint in OUT/checkpoints/latest
echo "adapter: $OUT/checkpoints/$(cat "$OUT/checkpoints/latest")"
