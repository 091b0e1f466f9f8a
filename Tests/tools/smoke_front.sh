#!/usr/bin/env bash
# smoke_front.sh [BOOTSTRAP] — proves Tests/tools/kafka_front.py with kcat.
#
# Starts librdkafka's mock cluster (kafka-out dev-cluster; $KAFKA_OUT, default
# /tmp/front-bin/kafka-out) unless a PLAINTEXT bootstrap list is given, makes test
# certificates, and for each case starts a TLS/SASL front and runs kcat against it.
# Cases that must work produce a few messages and read them back; cases that must
# fail must make kcat exit non-zero with the expected error text.
# Prints PASS/FAIL per case; exits non-zero if any case is wrong.
# KEEP=1 keeps the work directory (front logs, kcat output).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
front_py=$here/kafka_front.py
certs_sh=$here/make_test_certs.sh
KAFKA_OUT=${KAFKA_OUT:-/tmp/front-bin/kafka-out}
TOPIC=${TOPIC:-t1}
KCAT_TIMEOUT=${KCAT_TIMEOUT:-20}

for tool in kcat openssl python3 timeout; do
  command -v "$tool" >/dev/null || { echo "smoke_front: $tool not found (apt-get install -y kcat openssl)" >&2; exit 2; }
done

work=$(mktemp -d /tmp/smokefront.XXXXXX)
chmod 700 "$work"
pids=()

cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- upstream: the mock cluster -------------------------------------------
if [ $# -ge 1 ]; then
  bootstrap=$1
else
  mkdir -m 700 "$work/mc"
  "$KAFKA_OUT" dev-cluster --run-dir "$work/mc" --brokers 3 --topic "$TOPIC:4" >"$work/mc.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 150); do [ -s "$work/mc/dev-cluster.bootstrap" ] && break; sleep 0.1; done
  bootstrap=$(cat "$work/mc/dev-cluster.bootstrap" 2>/dev/null)
  if [ -z "$bootstrap" ]; then echo "smoke_front: mock cluster did not start:" >&2; cat "$work/mc.log" >&2; exit 2; fi
fi
echo "upstream (plaintext mock cluster): $bootstrap"

"$certs_sh" "$work/certs" || { echo "smoke_front: make_test_certs.sh failed" >&2; exit 2; }
C=$work/certs

python3 "$front_py" --self-test || { echo "FAIL  kafka_front --self-test"; exit 1; }

failures=0
front_pid=
ports=

start_front() { # start_front CASE FRONT-ARGS...
  local name=$1; shift
  rm -f "$work/ports.$name"
  python3 "$front_py" --upstream "$bootstrap" --ports-file "$work/ports.$name" \
    --log "$work/front.$name.log" "$@" >"$work/front.$name.out" 2>&1 &
  front_pid=$!
  pids+=("$front_pid")
  for _ in $(seq 200); do
    [ -s "$work/ports.$name" ] && break
    kill -0 "$front_pid" 2>/dev/null || break
    sleep 0.1
  done
  ports=$(cat "$work/ports.$name" 2>/dev/null)
  [ -n "$ports" ]
}

stop_front() {
  kill "$front_pid" 2>/dev/null
  wait "$front_pid" 2>/dev/null
  front_pid=
}

# pass_case NAME --front FRONT-ARGS... --kcat KCAT-ARGS... [--group]
pass_case() {
  local name=$1; shift
  local -a fargs=() kargs=(); local mode= group=0
  for a in "$@"; do
    case "$mode:$a" in
      *:--front) mode=f ;; *:--kcat) mode=k ;; *:--group) group=1 ;;
      f:*) fargs+=("$a") ;; k:*) kargs+=("$a") ;;
    esac
  done
  if ! start_front "$name" "${fargs[@]}"; then
    echo "FAIL  $name: front did not start: $(tail -3 "$work/front.$name.out")"; failures=$((failures + 1)); return
  fi
  local tag="smoke-$name-$$-$RANDOM" i want=()
  for i in 1 2 3; do want+=("$tag-$i"); done
  printf '%s\n' "${want[@]}" | timeout "$KCAT_TIMEOUT" kcat -b "$ports" "${kargs[@]}" -P -t "$TOPIC" \
    >"$work/$name.produce" 2>&1
  local prc=$?
  if [ "$group" = 1 ]; then
    # balanced consumer: exercises FindCoordinator (rewritten) and the group protocol
    timeout "$KCAT_TIMEOUT" kcat -b "$ports" "${kargs[@]}" -G "smoke-$name-$$" -X auto.offset.reset=earliest \
      -e -q "$TOPIC" >"$work/$name.consume" 2>"$work/$name.consume.err"
  else
    timeout "$KCAT_TIMEOUT" kcat -b "$ports" "${kargs[@]}" -C -t "$TOPIC" -o beginning -e -q \
      >"$work/$name.consume" 2>"$work/$name.consume.err"
  fi
  local crc=$? got=0
  for i in "${want[@]}"; do grep -qxF "$i" "$work/$name.consume" && got=$((got + 1)); done
  stop_front
  if [ $prc -eq 0 ] && [ $crc -eq 0 ] && [ $got -eq 3 ]; then
    echo "PASS  $name (produced 3, read back $got)"
  else
    echo "FAIL  $name: produce rc=$prc, consume rc=$crc, read back $got of 3"
    sed 's/^/        /' "$work/$name.produce" "$work/$name.consume.err" | grep -v '^ *$' | head -6
    failures=$((failures + 1))
  fi
}

# fail_case NAME EXPECTED-REGEX --front FRONT-ARGS... --kcat KCAT-ARGS...
fail_case() {
  local name=$1 expect=$2; shift 2
  local -a fargs=() kargs=(); local mode=
  for a in "$@"; do
    case "$mode:$a" in
      *:--front) mode=f ;; *:--kcat) mode=k ;;
      f:*) fargs+=("$a") ;; k:*) kargs+=("$a") ;;
    esac
  done
  if ! start_front "$name" "${fargs[@]}"; then
    echo "FAIL  $name: front did not start: $(tail -3 "$work/front.$name.out")"; failures=$((failures + 1)); return
  fi
  printf 'must-not-arrive-%s\n' "$name" | timeout "$KCAT_TIMEOUT" kcat -b "$ports" "${kargs[@]}" \
    -X message.timeout.ms=6000 -X socket.timeout.ms=3000 -X reconnect.backoff.max.ms=1000 \
    -P -t "$TOPIC" >"$work/$name.produce" 2>&1
  local rc=$?
  stop_front
  local line
  line=$(grep -E -m1 "$expect" "$work/$name.produce")
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ -n "$line" ]; then
    echo "PASS  $name (kcat rc=$rc, failed as expected)"
    echo "        ${line#*|FAIL|}"
  else
    echo "FAIL  $name: kcat rc=$rc (want non-zero, not a timeout) with output matching /$expect/"
    sed 's/^/        /' "$work/$name.produce" | head -6
    failures=$((failures + 1))
  fi
}

users=(--user alice:alice-secret --user "bob:b0b,p=ss")
tls=(-X "ssl.ca.location=$C/ca.pem" -X ssl.endpoint.identification.algorithm=https)
sasl() { # sasl MECHANISM USER PASSWORD
  echo -X security.protocol=SASL_SSL -X "sasl.mechanisms=$1" -X "sasl.username=$2" -X "sasl.password=$3"
}

# --- cases that must work ----------------------------------------------------
pass_case sasl-plain --front --cert "$C/server.pem" --key "$C/server.key" "${users[@]}" \
  --kcat $(sasl PLAIN alice alice-secret) "${tls[@]}"
pass_case sasl-scram-sha-256 --front --cert "$C/server.pem" --key "$C/server.key" "${users[@]}" \
  --kcat $(sasl SCRAM-SHA-256 alice alice-secret) "${tls[@]}"
pass_case sasl-scram-sha-512 --front --cert "$C/server.pem" --key "$C/server.key" "${users[@]}" \
  --kcat -X security.protocol=SASL_SSL -X sasl.mechanisms=SCRAM-SHA-512 -X sasl.username=bob \
  -X "sasl.password=b0b,p=ss" "${tls[@]}"
pass_case sasl-scram-consumer-group --group --front --cert "$C/server.pem" --key "$C/server.key" "${users[@]}" \
  --mechanism SCRAM-SHA-256 --kcat $(sasl SCRAM-SHA-256 alice alice-secret) "${tls[@]}"
pass_case ssl-only --front --cert "$C/server.pem" --key "$C/server.key" --no-sasl \
  --kcat -X security.protocol=SSL "${tls[@]}"
pass_case client-cert-presented --front --cert "$C/server.pem" --key "$C/server.key" --no-sasl --client-ca "$C/ca.pem" \
  --kcat -X security.protocol=SSL "${tls[@]}" -X "ssl.certificate.location=$C/client.pem" -X "ssl.key.location=$C/client.key"
pass_case client-cert-and-sasl --front --cert "$C/server.pem" --key "$C/server.key" --client-ca "$C/ca.pem" "${users[@]}" \
  --kcat $(sasl SCRAM-SHA-512 alice alice-secret) "${tls[@]}" \
  -X "ssl.certificate.location=$C/client.pem" -X "ssl.key.location=$C/client.key"
# control for wrong-hostname: the same certificate works without hostname verification
pass_case wronghost-cert-no-hostname-check --front --cert "$C/wronghost.pem" --key "$C/wronghost.key" --no-sasl \
  --kcat -X security.protocol=SSL -X "ssl.ca.location=$C/ca.pem" -X ssl.endpoint.identification.algorithm=none

# --- cases that must fail ------------------------------------------------------
fail_case wrong-password-scram 'SASL authentication error: Authentication failed: invalid credentials' \
  --front --cert "$C/server.pem" --key "$C/server.key" "${users[@]}" \
  --kcat $(sasl SCRAM-SHA-256 alice not-the-password) "${tls[@]}"
fail_case wrong-password-plain 'SASL authentication error: Authentication failed: invalid credentials' \
  --front --cert "$C/server.pem" --key "$C/server.key" "${users[@]}" \
  --kcat $(sasl PLAIN alice not-the-password) "${tls[@]}"
fail_case mechanism-not-enabled 'SASL SCRAM-SHA-512 mechanism handshake failed' \
  --front --cert "$C/server.pem" --key "$C/server.key" "${users[@]}" --mechanism PLAIN \
  --kcat $(sasl SCRAM-SHA-512 alice alice-secret) "${tls[@]}"
fail_case unknown-ca 'certificate verify failed' \
  --front --cert "$C/server.pem" --key "$C/server.key" "${users[@]}" \
  --kcat $(sasl PLAIN alice alice-secret) -X "ssl.ca.location=$C/other-ca.pem"
fail_case wrong-hostname 'certificate verify failed' \
  --front --cert "$C/wronghost.pem" --key "$C/wronghost.key" "${users[@]}" \
  --kcat $(sasl PLAIN alice alice-secret) "${tls[@]}"
fail_case client-cert-missing 'certificate required' \
  --front --cert "$C/server.pem" --key "$C/server.key" --no-sasl --client-ca "$C/ca.pem" \
  --kcat -X security.protocol=SSL "${tls[@]}"
fail_case client-cert-unknown-ca 'unknown ca' \
  --front --cert "$C/server.pem" --key "$C/server.key" --no-sasl --client-ca "$C/ca.pem" \
  --kcat -X security.protocol=SSL "${tls[@]}" -X "ssl.certificate.location=$C/other-ca.pem" \
  -X "ssl.key.location=$C/other-ca.key"

if [ $failures -ne 0 ]; then
  echo "smoke_front: $failures case(s) wrong"
  exit 1
fi
echo "smoke_front: all cases as expected"
