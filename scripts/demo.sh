#!/usr/bin/env bash
# The README's demo command: create .venv/ (scripts/bootstrap.sh), then run `certremove demo`
# (digits, an embedded Redis when CERTREMOVE_BROKER_URL is unset, a worker, deletions, a report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/certremove demo "$@"
