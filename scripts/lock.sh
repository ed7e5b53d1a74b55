#!/usr/bin/env bash
# Re-resolve requirements/{cpu,cuda}.lock from pyproject.toml (run after changing dependencies).
# The CPU lock needs the torch==2.13.0+cpu wheel: FIND_LINKS (default $PIP_FIND_LINKS) or TORCH_INDEX.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-.venv/bin/uv}
FIND_LINKS=${FIND_LINKS:-${PIP_FIND_LINKS:-}}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet)
cpu_src=()
if [ -n "$FIND_LINKS" ]; then cpu_src+=(--find-links "$FIND_LINKS"); else
  cpu_src+=(--extra-index-url "$TORCH_INDEX" --index-strategy unsafe-best-match); fi
"$uv" pip compile pyproject.toml --extra cpu --extra train --extra dev --extra audit \
  --excludes requirements/excludes-cpu.txt "${cpu_src[@]}" "${common[@]}" -o requirements/cpu.lock
"$uv" pip compile pyproject.toml --extra cuda --extra train --extra dev --extra audit "${common[@]}" -o requirements/cuda.lock
# The gateway image's lock (deploy/docker/Dockerfile): base dependencies only, at the CPU lock's versions.
"$uv" pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --quiet \
  --generate-hashes -c requirements/cpu.lock -o deploy/docker/gateway.lock
echo "locked: $(grep -c '==' requirements/cpu.lock) cpu, $(grep -c '==' requirements/cuda.lock) cuda pins," \
  "$(grep -c '==' deploy/docker/gateway.lock) in the gateway image"
