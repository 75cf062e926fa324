#!/usr/bin/env bash
# The main job: PPO on the tiny demo models, on a local Ray cluster, CPU only.
source "$(dirname "$0")/env.sh" || exit 1
exec rayrlhf train --config configs/tiny-cpu.yaml "$@"
