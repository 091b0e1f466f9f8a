#!/usr/bin/env bash
# Offline check of the systemd units in deploy/systemd (no running systemd needed):
#
#   1. `systemd-analyze verify` on every unit, inside a throwaway root that holds the host's system
#      units and stub executables (/usr/local/bin/ingest …, /bin/sh, /bin/kill), so verify can
#      check ExecStart paths without Sluice being installed. verify exits 0 even on parse errors
#      ("Unknown key", "Failed to parse …, ignoring"), so any line it prints is a failure here.
#   2. sluice.sysusers, applied with systemd-sysusers to a scratch root, creates user and group.
#   3. The output templates' sh wrapper: instance N → `--instance KIND-N` and metrics port
#      BASE + N; a bad instance (0, 02, 100, abc, empty) exits 64 without starting anything.
#
# Usage: Tests/tools/validate_systemd.sh [UNIT_DIR]   (default: deploy/systemd)
# Needs systemd-analyze (Debian: apt-get install systemd). Exits non-zero on any failure.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
unit_dir="$(realpath "${1:-$repo/deploy/systemd}")"
failures=0
fail() { printf 'FAIL: %s\n' "$*"; failures=$((failures + 1)); }
ok() { printf 'ok:   %s\n' "$*"; }

command -v systemd-analyze >/dev/null || { echo "systemd-analyze not found (apt-get install systemd)"; exit 2; }

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/usr/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/"
ln -s usr/bin "$root/bin"   # merged /usr inside the throwaway root, whatever the host has
for exe in usr/local/bin/ingest usr/local/bin/router usr/local/bin/kafka-out usr/local/bin/keen-out usr/bin/sh usr/bin/kill; do
    [ -e "$root/$exe" ] || { printf '#!/bin/sh\n' >"$root/$exe"; chmod +x "$root/$exe"; }
done

units=()
for f in "$unit_dir"/*.service "$unit_dir"/*.target; do
    [ -e "$f" ] || continue
    cp "$f" "$root/etc/systemd/system/"
    name="$(basename "$f")"
    case "$name" in
    *@.service) units+=("${name%@.service}@1.service" "${name%@.service}@2.service") ;;
    *) units+=("$name") ;;
    esac
done
[ ${#units[@]} -gt 0 ] || { echo "no units in $unit_dir"; exit 1; }

for u in "${units[@]}"; do
    out="$(systemd-analyze verify --root="$root" "$u" 2>&1)"
    rc=$?
    if [ $rc -ne 0 ] || [ -n "$out" ]; then
        fail "systemd-analyze verify $u (exit $rc)"
        printf '%s\n' "$out" | sed "s|$root||g; s|^|      |"
    else
        ok "systemd-analyze verify $u"
    fi
done

# The sysusers.d file creates the user the units run as.
if [ -e "$unit_dir/sluice.sysusers" ]; then
    mkdir -p "$root/sysusers/etc"
    out="$(systemd-sysusers --root="$root/sysusers" "$unit_dir/sluice.sysusers" 2>&1)"
    if [ $? -eq 0 ] && grep -q '^sluice:.*:/usr/sbin/nologin$' "$root/sysusers/etc/passwd" 2>/dev/null &&
        grep -q '^sluice:' "$root/sysusers/etc/group" 2>/dev/null; then
        ok "systemd-sysusers sluice.sysusers creates user and group sluice"
    else
        fail "systemd-sysusers sluice.sysusers"
        printf '%s\n' "$out" | sed 's/^/      /'
    fi
fi

# The wrapper of each template, run with `echo` in place of the binary.
wrapper() { # FILE: the sh -c script of its ExecStart, systemd's $$ unescaped
    sed -n "s|^ExecStart=/bin/sh -c '\(.*\)' sh %i\$|\1|p" "$1" | sed 's/\$\$/$/g'
}
for f in "$unit_dir"/*@.service; do
    [ -e "$f" ] || continue
    kind="$(basename "$f" @.service)"
    kind="${kind#sluice-}"
    script="$(wrapper "$f")"
    [ -n "$script" ] || { fail "$(basename "$f"): no /bin/sh -c '…' sh %i ExecStart"; continue; }
    base="$(printf '%s' "$script" | sed -n 's/.*\$((\([0-9]*\) + \$1)).*/\1/p')"
    [ -n "$base" ] || { fail "$(basename "$f"): no metrics port base in the wrapper"; continue; }
    script="${script//exec \/usr\/local\/bin\/$kind /exec echo }"
    for n in 1 2 9 10 99; do
        got="$(SLUICE_METRICS_HOST=127.0.0.1 sh -c "$script" sh "$n" 2>&1)"
        want_instance="--instance $kind-$n"
        want_port="--metrics-listen 127.0.0.1:$((base + n))"
        if [[ "$got" == *"$want_instance"* && "$got" == *"$want_port"* ]]; then
            ok "$kind@$n → $want_instance $want_port"
        else
            fail "$kind@$n: expected '$want_instance' and '$want_port', got: $got"
        fi
    done
    for n in 0 02 100 abc '' 1a; do
        got="$(SLUICE_METRICS_HOST=127.0.0.1 sh -c "$script" sh "$n" 2>&1)"
        rc=$?
        if [ $rc -eq 64 ]; then
            ok "$kind@'$n' refused (exit 64)"
        else
            fail "$kind@'$n' should be refused with exit 64, got exit $rc: $got"
        fi
    done
done

if [ $failures -gt 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all systemd unit checks passed"
