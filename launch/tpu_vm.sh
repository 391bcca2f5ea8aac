#!/usr/bin/env bash
# Train on a Cloud TPU VM (single host or pod slice): create or reuse the VM,
# install qaff_jax on every worker, start the same command on all of them.
# jax.distributed.initialize() picks up the TPU topology by itself. The bucket is
# mounted with gcsfuse at ~/bucket on every worker (the trainer reads and writes
# local/FUSE paths): data from ~/bucket/..., the workdir at ~/bucket/$RUN.
#
#   ZONE=us-central2-b TPU=v4-32 NAME=qaff BUCKET=gs://my-bucket \
#     bash launch/tpu_vm.sh configs/gldv2.py:backbone=resnet101 runs/r101 [extra flags]
set -euo pipefail
CONFIG=${1:?config, e.g. configs/gldv2.py}
RUN=${2:?run name under \$BUCKET, e.g. runs/r101}
shift 2
: "${ZONE:?set ZONE}" "${TPU:?set TPU (accelerator type, e.g. v4-32)}" "${BUCKET:?set BUCKET (gs://...)}"
NAME=${NAME:-qaff}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO=${REPO:-$(git config --get remote.origin.url || true)}
BRANCH=${BRANCH:-main}

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" \
    --accelerator-type "$TPU" --version "$VERSION"
fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"
}

ssh_all "set -e; if [ ! -d qaff_jax ]; then git clone -b $BRANCH $REPO qaff_jax; fi
  cd qaff_jax && git fetch -q && git checkout -q $BRANCH && git pull -q
  python3 -m venv ~/venv && . ~/venv/bin/activate && pip install -q -U pip
  pip install -q -e '.[tpu]'
  if ! command -v gcsfuse >/dev/null; then
    echo 'deb https://packages.cloud.google.com/apt gcsfuse-jammy main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list
    curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
    sudo apt-get -qq update && sudo apt-get -qq install -y gcsfuse
  fi
  mkdir -p ~/bucket && (mountpoint -q ~/bucket || gcsfuse --implicit-dirs ${BUCKET#gs://} ~/bucket)"

ARGS=$(printf ' %q' "$@")
ssh_all "cd qaff_jax && . ~/venv/bin/activate && \
  nohup python -m qaff_jax.train --config $CONFIG --workdir ~/bucket/$RUN $ARGS \
  > ~/train.log 2>&1 &"
echo "started on all workers of $NAME; logs: gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=0 --command 'tail -f ~/train.log'"
