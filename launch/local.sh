#!/usr/bin/env bash
# One host, all of its local devices (GPUs, a single-host TPU VM, or CPU).
#
#   launch/local.sh CONFIG WORKDIR [--config.field=value ...]
#   launch/local.sh configs/drnet_cifar10.py:S runs/drnet_s --config.train.global_batch_size=256
#
# CONFIG and WORKDIR are relative to the current directory. Uses $PYTHON if set, else the
# repository's .venv/bin/python if present, else python3. Installs the package (editable, with
# $EXTRAS, e.g. EXTRAS=cuda or EXTRAS=tpu) when it cannot be imported.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import dynroute_jax" >/dev/null 2>&1; then
  spec="$REPO"
  if [[ -n "${EXTRAS:-}" ]]; then spec="$REPO[${EXTRAS}]"; fi
  "$PYTHON" -m pip install -q -e "$spec"
fi
exec "$PYTHON" -m dynroute_jax.main --config="$1" --workdir="$2" "${@:3}"
