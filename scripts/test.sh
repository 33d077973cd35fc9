#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
set +e
# Without arguments: the test suite, then the notebooks of examples/, executed by nbmake
# (testpaths is tests/ only, so a plain `pytest` leaves them out).
[ "$#" -eq 0 ] && set -- tests examples --nbmake --nbmake-timeout=900
python -m pytest -q "$@"
status=$?
set -e
# pytest's 5 means no test ran: that is a failure here.
[ "$status" -eq 5 ] && echo "no tests ran" >&2 && exit 1
exit "$status"
