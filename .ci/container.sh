#!/usr/bin/env bash
# CI: build the app's container image on a debootstrapped Debian base (no registry image is
# reachable here, and no OCI runtime can start: podman and buildah with chroot isolation), run the
# image's own command, and check from outside that the app answers GET /public_models and that a
# fixture image goes through REST POST /predict -> GET /from_task to class probabilities.
# Exits nonzero on any failure; prints the image size and the time of each phase.
#
# The base image is made once and kept in podman's store (MELANOMA_REFRESH_BASE=1 remakes it).
# Extra arguments go to `podman build`, e.g. `--build-arg TORCH=cuda`.
# Needs root, podman, buildah, debootstrap, curl and python3 (.ci/run installs the first three).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=melanoma-app
BASE=localhost/bookworm-base
FIXTURE=tests/fixtures/isic2017/test/ISIC_0012258.jpg
PORT=${MELANOMA_CONTAINER_PORT:-$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
URL=http://127.0.0.1:$PORT
LOG=$(mktemp /tmp/melanoma-container.XXXXXX.log)

declare -a PHASES=()
phase_start=$(date +%s)
phase_done() {  # record the time since the previous phase ended
  local now
  now=$(date +%s)
  PHASES+=("$(printf '%-34s %5d s' "$1" $((now - phase_start)))")
  phase_start=$now
}
report() {
  echo "== phases"
  printf '  %s\n' "${PHASES[@]}"
}

# ---------------------------------------------------------------------------------- base image
if [[ "${MELANOMA_REFRESH_BASE:-0}" == 1 ]] || ! podman image exists "$BASE"; then
  rootfs=$(mktemp -d /var/tmp/bookworm-base.XXXXXX)
  debootstrap --variant=minbase bookworm "$rootfs" >"$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
  tar -C "$rootfs" -c . | podman import - "$BASE" >/dev/null
  rm -rf "$rootfs"
  phase_done "base: debootstrap + podman import"
else
  phase_done "base: cached $BASE"
fi

# ---------------------------------------------------------------------------------- build
podman build --isolation=chroot --format docker \
  --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt \
  --build-arg BASE="$BASE" -t "$IMAGE" "$@" .
phase_done "build: podman build"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "== image $IMAGE: $((size / 1000000)) MB ($size bytes)"

# ---------------------------------------------------------------------------------- run
ctr=$(buildah from --pull-never "$IMAGE")
app_pid=
cleanup() {
  if [[ -n "$app_pid" ]]; then
    kill -TERM -- "-$app_pid" 2>/dev/null || true
    wait "$app_pid" 2>/dev/null || true
  fi
  buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -f "$LOG"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  echo "== app log (tail)"
  tail -40 "$LOG"
  report
  exit 1
}

user=$(buildah run --isolation chroot "$ctr" -- id -un)
[[ "$user" != root ]] || fail "the image runs as root"
mapfile -t cmd < <(podman image inspect --format '{{range .Config.Cmd}}{{println .}}{{end}}' "$IMAGE")
echo "== running the image's command as $user on port $PORT: ${cmd[*]}"
setsid buildah run --isolation chroot --network host --env GRADIO_SERVER_PORT="$PORT" "$ctr" -- "${cmd[@]}" \
  >"$LOG" 2>&1 &
app_pid=$!

for _ in $(seq 300); do
  kill -0 "$app_pid" 2>/dev/null || fail "the app exited"
  curl -sf -o /dev/null "$URL/public_models" && break
  sleep 1
done
models=$(curl -sf "$URL/public_models") || fail "GET /public_models does not answer"
phase_done "run: start until /public_models"
python3 -c "
import json, sys
body = json.loads(sys.argv[1])
broken = [m['model_id'] for m in body['models'] if 'error' in m]
assert body['models'] and not broken, f'models: {[m[\"model_id\"] for m in body[\"models\"]]}, broken: {broken}'
print('== GET /public_models: default', body['default'], '; models', ', '.join(m['model_id'] for m in body['models']))
" "$models" || fail "GET /public_models: no models, or broken ones"
phase_done "check: /public_models (loads all)"

# ---------------------------------------------------------------------------------- predict
task=$(curl -sf -F "file=@$FIXTURE" "$URL/predict") || fail "POST /predict"
uuid=$(python3 -c "import json, sys; print(json.loads(sys.argv[1])['task_uuid'])" "$task")
for _ in $(seq 120); do
  result=$(curl -sf "$URL/from_task/$uuid") || fail "GET /from_task/$uuid"
  [[ "$result" == *'"status":"pending"'* ]] || break
  sleep 1
done
python3 -c "
import json, math, sys
body = json.loads(sys.argv[1])
assert body['status'] == 'done', body
probs = body['results'][0]['probabilities']
assert probs and math.isclose(sum(probs.values()), 1, abs_tol=1e-3), probs
print('== POST /predict -> GET /from_task:', body['model_id'], sys.argv[2], {k: round(v, 3) for k, v in probs.items()})
" "$result" "$(basename "$FIXTURE")" || fail "GET /from_task: no probabilities: ${result:0:500}"
phase_done "check: /predict -> /from_task"

kill -TERM -- "-$app_pid"
wait "$app_pid" 2>/dev/null || true
app_pid=
phase_done "stop"
report
echo "== container check passed"
