#!/usr/bin/env bash
# Flow-guided decoding on the published Amazon Video_Games data (docs/guidance.md): SFT with the
# tiny default model trained to its best validation loss (checked every 1,024 steps on 1,000
# valid samples, patience 2, at most 3 epochs), then the whole test split decoded with beam
# search and with guided beam search (beta and form chosen on 1,000 valid users), and
# most-popular's NDCG@10 on the same users. The README's guided Video_Games rows come from
#   scripts/video_games_guided.sh ../shared/data/flower_official/Video_Games runs/vg-guided
# (about 2.5 hours on 2 cores; a rerun resumes the training and redoes the evaluations).
set -euo pipefail
if [[ $# -ne 2 ]]; then
    echo "usage: $0 VIDEO_GAMES_DATASET_FOLDER OUT_FOLDER" >&2
    exit 2
fi
data=$1
out=$2
resume=()
[[ -f "$out/sft/train_config.json" ]] && resume=(--resume)
flower-rec train --data "$data" --out "$out/sft" --method sft --domain video_games \
    --epochs 3 --eval-steps 1024 --save-steps 1024 --valid-limit 1000 \
    --early-stopping-patience 2 --seed 0 "${resume[@]}"
for guidance in 0 auto; do
    flower-rec evaluate --data "$data" --model "$out/sft" --domain video_games --mode beam \
        --guidance "$guidance" --guidance-users 1000 --out "$out/beam-guidance-$guidance"
done
python - "$data" <<'PY'
import sys

from flower_rec.data import load_dataset
from flower_rec.auxiliary import most_popular_baseline

metrics = most_popular_baseline(load_dataset(sys.argv[1]), "test", exclude_history=False,
                                counts="history")
print(f"most-popular on test: NDCG@10 {metrics['NDCG@10']:.4f}, HR@10 {metrics['HR@10']:.4f}")
PY
