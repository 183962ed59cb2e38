#!/usr/bin/env bash
# SFT vs Flower on the published Amazon Video_Games data (the paper's dataset), with the tiny
# default model on CPU: about an hour on 2 cores. The README's real-data table comes from
#   scripts/video_games.sh ../shared/data/flower_official/Video_Games runs/video_games
# Extra arguments go to `flower-rec demo` (e.g. --epochs 2, --quick for a smoke run).
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 VIDEO_GAMES_DATASET_FOLDER OUT_FOLDER [flower-rec demo options]" >&2
    exit 2
fi
data=$1
out=$2
shift 2
exec flower-rec demo --data "$data" --out "$out" --domain video_games \
    --epochs 1 --theta 0.9995 --reward logp_div_s "$@"
