#!/usr/bin/env bash
# The test suite, end-to-end runs of the real stack included. Extra args go to pytest.
source "$(dirname "$0")/env.sh" || exit 1
exec python -m pytest "$@"
