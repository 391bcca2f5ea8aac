#!/usr/bin/env bash
# ScaNN evaluation on a cloud VM against descriptors kept in a bucket.
#
#   BUCKET=gs://my-bucket ZONE=us-central1-a NAME=qaff-eval \
#     bash launch/eval_scann.sh runs/r101/eval/descriptors roxford5k [extra evaluate flags]
#
# e.g. `--target_recall 0.95` tunes the index for that recall@k on held-out
# database rows (or picks exact search when faster); the tuned settings are
# saved as qaff_search_settings.json inside the index folder and re-used.
#
# Creates (or reuses) a CPU VM, installs qaff_jax, copies the descriptor .npy
# files (<name>_query.npy, <name>_db.npy) and gnd_<name>.pkl from the bucket,
# builds the ScaNN index (kept in the bucket beside the report), and writes
# report.json / report.md back to $BUCKET/<descriptors>/scann_<name>/.
set -euo pipefail
DESC=${1:?descriptor folder under \$BUCKET (holding NAME_query.npy, NAME_db.npy, gnd_NAME.pkl)}
DATASET=${2:?dataset name, e.g. roxford5k}
shift 2
: "${BUCKET:?set BUCKET (gs://...)}" "${ZONE:?set ZONE}"
NAME=${NAME:-qaff-eval}
MACHINE=${MACHINE:-n2-highmem-16}
REPO=${REPO:-$(git config --get remote.origin.url || true)}
BRANCH=${BRANCH:-main}

if ! gcloud compute instances describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute instances create "$NAME" --zone "$ZONE" --machine-type "$MACHINE" \
    --image-family debian-12 --image-project debian-cloud --boot-disk-size 200GB \
    --scopes storage-rw
fi

ARGS=$(printf ' %q' "$@")
gcloud compute ssh "$NAME" --zone "$ZONE" --command "set -euo pipefail
  sudo apt-get -qq update && sudo apt-get -qq install -y git python3-venv >/dev/null
  [ -d qaff_jax ] || git clone -q -b $BRANCH $REPO qaff_jax
  cd qaff_jax && git pull -q && python3 -m venv .venv && . .venv/bin/activate
  pip install -q -U pip && pip install -q -e .
  mkdir -p data && gcloud storage cp '$BUCKET/$DESC/${DATASET}_query.npy' '$BUCKET/$DESC/${DATASET}_db.npy' '$BUCKET/$DESC/gnd_${DATASET}.pkl' data/
  python -m qaff_jax.evaluate --query_features data/${DATASET}_query.npy \
    --db_features data/${DATASET}_db.npy --gnd data/gnd_${DATASET}.pkl \
    --search scann --scann_dir out/scann_${DATASET}/index --out out/scann_${DATASET} $ARGS
  gcloud storage cp -r out/scann_${DATASET} '$BUCKET/$DESC/'"
echo "report: $BUCKET/$DESC/scann_${DATASET}/report.md"
