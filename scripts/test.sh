#!/usr/bin/env bash
# The test command: set-up, then the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The suite needs about 0.7 GB of temporary space at its peak (tmp_path of passing tests is removed as they
# finish) beside the 6 GB .venv; a CI run that fails with many setup errors at once is most likely out of disk.
echo "test: free disk: $(df -h --output=avail . | tail -1 | tr -d ' ') here, $(df -h --output=avail "${TMPDIR:-/tmp}" | tail -1 | tr -d ' ') in ${TMPDIR:-/tmp}"
exec .venv/bin/python -m pytest "$@"
