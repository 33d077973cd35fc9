#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
set +e
python -m pytest -q "$@"
status=$?
set -e
# pytest's 5 means no test ran: that is a failure here.
[ "$status" -eq 5 ] && echo "no tests ran" >&2 && exit 1
exit "$status"
