#!/usr/bin/env bash
# TAKD's Table 1 (CIFAR-10, plain CNNs) and a DGKD column, from experiments/takd_cifar10_plain_table1.yaml:
# the student alone, KD, TAKD and DGKD, one shared plane10 teacher and plane4 assistant (trained by the first
# column that needs them, reused by the rest through the model store).
#
# Resumable: run it again after a kill or a reboot and every finished column is reused, the interrupted one
# continues from its last epoch (kdray train continues an unfinished run of the same config). It runs at
# the lowest CPU priority, so it can go on in the background while the machine does other work:
#   nohup scripts/reproduce_takd_table1.sh > /dev/null 2>&1 &
# Everything it writes (model store, MLflow store, checkpoints, one log per column) is under $REPRO_DIR
# (default ~/.cache/kdray/takd-table1); docs/reproductions/takd_cifar10_plain/ holds the committed logs.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$PWD
data=${DATA:-$checkout/../shared/data/cifar10-train-jpg.tar.gz}
work=${REPRO_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kdray/takd-table1}
mkdir -p "$work/logs"
# A long stage's checkpoint committed by a session that could not finish it (a new machine has no $work):
# experiments/results/takd_cifar10_plain/checkpoints/stage-<key>.state.pt continues stage <key> where it was.
for saved in "$checkout"/experiments/results/takd_cifar10_plain/checkpoints/stage-*.state.pt; do
    [ -e "$saved" ] || continue
    stage=$(basename "$saved" .state.pt)
    if [ ! -e "$work/ray/$stage/state.pt" ] && [ ! -e "$work/store/${stage#stage-}" ]; then
        (cd "$(dirname "$saved")" && sha256sum --quiet -c "$stage.state.pt.sha256")
        mkdir -p "$work/ray/$stage" && cp "$saved" "$work/ray/$stage/state.pt"
        echo "== continuing $stage from the committed checkpoint $saved"
    fi
done
cd "$work"
common=(
    "data.root=$data" "store.path=$work/store" "scaling.storage_path=$work/ray"
    "tracking.uri=sqlite:///$work/mlflow.db" "scaling.threads=${THREADS:-2}"
)
declare -A columns=(
    [alone]='method.name=none assistants={}'
    [kd]='assistants.depth=0'
    [takd]=''
    [dgkd]='method.name=dgkd'
)
for column in ${COLUMNS:-alone kd takd dgkd}; do
    read -r -a extra <<< "${columns[$column]}"
    echo "== $column: kdray train ${extra[*]}" | tee -a "$work/logs/$column.log"
    nice -n 19 kdray train "$checkout/experiments/takd_cifar10_plain_table1.yaml" "${common[@]}" "${extra[@]}" \
        "tracking.run_name=table1-$column" 2>&1 | tee -a "$work/logs/$column.log"
done
