#!/usr/bin/env bash
# The test command: dependencies, build, then every test (unit and integration on the simulator).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
swift build
swift test --parallel "$@"
# The HTTP API against openapi.yaml (schemathesis) and /metrics against the stats endpoint.
scripts/api-conformance.sh
