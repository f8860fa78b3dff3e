#!/usr/bin/env bash
# A Cloud TPU VM slice (single- or multi-host): copies this checkout to every worker, installs it
# with the tpu extra, and runs the same command on all workers at once.
#
#   TPU=my-v5e-256 ZONE=us-west4-a launch/tpu_pod.sh CONFIG WORKDIR [--config.field=value ...]
#
# Environment: TPU, ZONE (required), PROJECT (optional, else gcloud's default), DETACH=1 to run
# under nohup and return at once (log in ~/dynroute_train.log on each worker), SKIP_INSTALL=1 to
# reuse the environment installed by a previous call.
# CONFIG is relative to the repository root (workers run there); WORKDIR must be storage every
# worker sees, given as an absolute path or a bucket URL (see launch/README.md).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: TPU=... ZONE=... $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
# Every launch replaces ~/dynroute_jax, the code directory the workers run in: a relative WORKDIR
# would lie inside it and be deleted with the earlier checkpoints on the next launch.
case "$2" in
  /*|*://*) ;;
  *) echo "$0: WORKDIR must be an absolute path every worker sees (e.g. a Filestore mount) or a" \
          "bucket URL (gs://...), not '$2': each launch replaces ~/dynroute_jax, where a" \
          "relative one would be." >&2
     exit 2 ;;
esac
cd "$(dirname "$0")/.."
GCLOUD=(gcloud compute tpus tpu-vm)
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

# The same code on every worker: the committed tree plus uncommitted changes to tracked files.
ARCHIVE=$(mktemp -t dynroute_XXXX.tar.gz)
trap 'rm -f "$ARCHIVE"' EXIT
STASH=$(git stash create)
git archive --format=tar.gz -o "$ARCHIVE" "${STASH:-HEAD}"
"${GCLOUD[@]}" scp "$ARCHIVE" "$TPU":dynroute_jax.tar.gz --zone="$ZONE" --worker=all "${PROJECT_FLAG[@]}"

ARGS=$(printf '%q ' --config="$1" --workdir="$2" --config.distributed.initialize=always "${@:3}")
SETUP="rm -rf ~/dynroute_jax && mkdir -p ~/dynroute_jax && tar -xzf ~/dynroute_jax.tar.gz -C ~/dynroute_jax"
if [[ -z "${SKIP_INSTALL:-}" ]]; then
  SETUP="$SETUP && (test -x ~/dynroute_venv/bin/python || python3 -m venv ~/dynroute_venv)"
  SETUP="$SETUP && ~/dynroute_venv/bin/pip install -q --upgrade pip"
  SETUP="$SETUP && ~/dynroute_venv/bin/pip install -q -e ~/dynroute_jax'[tpu]'"
fi
RUN="cd ~/dynroute_jax && ~/dynroute_venv/bin/python -m dynroute_jax.main $ARGS"
if [[ -n "${DETACH:-}" ]]; then
  RUN="nohup bash -c $(printf '%q' "$RUN") > ~/dynroute_train.log 2>&1 < /dev/null &"
fi
"${GCLOUD[@]}" ssh "$TPU" --zone="$ZONE" --worker=all "${PROJECT_FLAG[@]}" \
  --command="set -e; $SETUP; $RUN"
