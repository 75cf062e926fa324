#!/usr/bin/env bash
# The main job: the whole RLHF recipe, SFT -> reward model -> PPO, on the tiny demo models, on a
# local Ray cluster, CPU only. Extra arguments are --set overrides of the pipeline config.
source "$(dirname "$0")/env.sh" || exit 1
exec rayrlhf pipeline --config configs/tiny-cpu-pipeline.yaml "$@"
