#!/usr/bin/env bash
# The main job: the whole RLHF recipe, SFT -> reward model -> PPO, on the tiny demo models, on a
# local Ray cluster, CPU only. Extra arguments are --set overrides of the pipeline config.
# It replaces its previous run in runs/tiny-pipeline/ (overwrite=true), so it can be rerun.
source "$(dirname "$0")/env.sh" || exit 1
exec rayrlhf pipeline --config configs/tiny-cpu-pipeline.yaml --set overwrite=true "$@"
