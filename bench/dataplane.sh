#!/usr/bin/env bash
# Data-plane benchmark: iperf3 TCP throughput and ping RTT between two network namespaces, in one
# run, over: the raw veth, wireguard-go (Debian), boringtun-cli (crates.io), nebula (Debian), and
# bulkheadd with a realistic allowlist, with and without its filter (a benchmark-only build).
#
#   bench/dataplane.sh                 # RUNS=3 runs of SECS=5 seconds per tunnel
#   RUNS=5 SECS=10 bench/dataplane.sh
#
# Needs root. Installs what it needs. Traffic stays inside the two namespaces it creates, on
# 198.18.1.0/24 (RFC 2544's benchmark range), and everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SECS=${SECS:-5}
# Which tunnels to measure; the report covers those measured.
TUNNELS=${TUNNELS:-"raw wireguard-go boringtun-cli nebula bulkheadd unfiltered"}
want() { [[ " $TUNNELS " == *" $1 "* ]]; }
TOOLS=$PWD/target/bench-tools
WORK=$(mktemp -d /tmp/bulkhead-bench.XXXXXX)
A=bhbA$$
B=bhbB$$
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -f /var/run/wireguard/{wgA,wgB,btA,btB,bhA,bhB}$$.sock
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '%s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------------
need=()
for pair in iperf3:iperf3 wireguard-go:wireguard-go nebula:nebula nebula-cert:nebula wg:wireguard-tools \
            ping:iputils-ping ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
if [ ! -x "$TOOLS/bin/boringtun-cli" ]; then
  log "installing boringtun-cli from crates.io into $TOOLS"
  cargo install --quiet --locked boringtun-cli --root "$TOOLS" >&2
fi
log "building bulkheadd (release), with and without the filter"
cargo build --quiet --release -p bulkhead-node -p bulkhead-cli >&2
cargo build --quiet --release -p bulkhead-node --features bulkhead-dataplane/unfiltered \
  --target-dir target/bench-unfiltered >&2
BULKHEAD=$PWD/target/release/bulkhead
BULKHEADD=${BULKHEADD:-$PWD/target/release/bulkheadd}
BULKHEADD_UNFILTERED=$PWD/target/bench-unfiltered/release/bulkheadd

# --- the two hosts -----------------------------------------------------------------------------
ip netns add "$A"
ip netns add "$B"
ip link add "va$$" netns "$A" type veth peer name "vb$$" netns "$B"
ip -n "$A" addr add 198.18.1.1/24 dev "va$$"
ip -n "$B" addr add 198.18.1.2/24 dev "vb$$"
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set "va$$" up
ip -n "$B" link set "vb$$" up
inA() { ip netns exec "$A" "$@"; }
inB() { ip netns exec "$B" "$@"; }
# Starts a daemon in a namespace. `ip netns exec` execs the command, so $! is the daemon itself
# and stop_daemons really stops it.
bg() { local ns=$1; shift; ip netns exec "$ns" "$@" >>"$WORK/daemons.log" 2>&1 & PIDS+=($!); }

# One iperf3 run to $1: prints bits per second.
one_run() {
  inB timeout $((SECS + 15)) iperf3 -s -1 >/dev/null 2>&1 &
  local srv=$!
  sleep 0.3
  inA timeout $((SECS + 10)) iperf3 -c "$1" -t "$SECS" -J 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])' 2>/dev/null || echo 0
  wait "$srv" 2>/dev/null || true
}

# Average ping RTT to $1 in ms.
rtt() {
  inA ping -q -c 20 -i 0.05 -W 1 "$1" 2>/dev/null | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p'
}

# Prints "median_gbps rtt_ms runs..." from an RTT and bits-per-second runs.
summarize() {
  python3 - "$@" <<'EOF'
import statistics, sys
rtt = sys.argv[1] or "nan"
runs = [float(x) / 1e9 for x in sys.argv[2:]]
print(f"{statistics.median(runs):.3f} {rtt} {' '.join(f'{r:.3f}' for r in runs)}")
EOF
}

# Runs iperf3 RUNS times to $1, prints "median_gbps rtt_ms runs...".
measure() {
  local results=() i
  for ((i = 0; i < RUNS; i++)); do results+=("$(one_run "$1")"); done
  summarize "$(rtt "$1")" "${results[@]}"
}

declare -A RESULT
record() { RESULT[$1]=$2; log "$1: median Gbit/s, RTT ms, runs: $2"; }

# --- raw veth ----------------------------------------------------------------------------------
if want raw; then record "raw veth" "$(measure 198.18.1.2)"; fi

# --- wg-compatible userspace implementations, configured with wg(8) ----------------------------
wg_pair() { # $1 = interface prefix, $2 = UDP port, $3.. = command that starts a daemon for an interface
  local pre=$1 port=$2; shift 2
  local ka kb pa pb
  ka=$(wg genkey); kb=$(wg genkey)
  pa=$(echo "$ka" | wg pubkey); pb=$(echo "$kb" | wg pubkey)
  echo "$ka" >"$WORK/ka"; echo "$kb" >"$WORK/kb"
  bg "$A" "$@" "${pre}A$$"
  bg "$B" "$@" "${pre}B$$"
  for _ in $(seq 50); do
    [ -S "/var/run/wireguard/${pre}A$$.sock" ] && [ -S "/var/run/wireguard/${pre}B$$.sock" ] && break
    sleep 0.1
  done
  inA wg set "${pre}A$$" private-key "$WORK/ka" listen-port "$port" \
    peer "$pb" allowed-ips 10.99.0.2/32 endpoint "198.18.1.2:$port"
  inB wg set "${pre}B$$" private-key "$WORK/kb" listen-port "$port" \
    peer "$pa" allowed-ips 10.99.0.1/32 endpoint "198.18.1.1:$port"
  inA ip addr add 10.99.0.1/24 dev "${pre}A$$"; inA ip link set "${pre}A$$" mtu 1420 up
  inB ip addr add 10.99.0.2/24 dev "${pre}B$$"; inB ip link set "${pre}B$$" mtu 1420 up
}
stop_daemons() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  PIDS=()
}

if want wireguard-go; then
  wg_pair wg 51820 env WG_PROCESS_FOREGROUND=1 wireguard-go -f
  record "wireguard-go" "$(measure 10.99.0.2)"
  stop_daemons
fi

if want boringtun-cli; then
  wg_pair bt 51821 "$TOOLS/bin/boringtun-cli" -f --disable-drop-privileges
  record "boringtun-cli" "$(measure 10.99.0.2)"
  stop_daemons
fi

# --- nebula ------------------------------------------------------------------------------------
(
  cd "$WORK"
  nebula-cert ca -name bench >/dev/null
  nebula-cert sign -name a -ip 10.98.0.1/24 >/dev/null
  nebula-cert sign -name b -ip 10.98.0.2/24 >/dev/null
  for h in a b; do
    other=$([ $h = a ] && echo b || echo a)
    oip=$([ $h = a ] && echo 198.18.1.2 || echo 198.18.1.1)
    oov=$([ $h = a ] && echo 10.98.0.2 || echo 10.98.0.1)
    cat >"$h.yml" <<EOF
pki: { ca: $WORK/ca.crt, cert: $WORK/$h.crt, key: $WORK/$h.key }
static_host_map: { "$oov": ["$oip:4242"] }
lighthouse: { am_lighthouse: false, hosts: [] }
listen: { host: 0.0.0.0, port: 4242 }
punchy: { punch: false }
tun: { dev: neb$h$$, mtu: 1420 }
logging: { level: warning }
firewall:
  outbound: [ { port: any, proto: any, host: any } ]
  inbound: [ { port: any, proto: any, host: any } ]
EOF
    : "$other"
  done
)
if want nebula; then
  bg "$A" nebula -config "$WORK/a.yml"
  bg "$B" nebula -config "$WORK/b.yml"
  sleep 1.5
  record "nebula" "$(measure 10.98.0.2)"
  stop_daemons
fi

# --- bulkheadd ---------------------------------------------------------------------------------
# A realistic allowlist: a and b among 200 identities and 300 rules, a -> b on iperf3's port.
python3 - "$WORK/policy.yaml" <<'EOF'
import random, sys
random.seed(7)
y = ["version: 1", "network: { cidr: 10.97.0.0/16 }", "identities:",
     "  a: { labels: { app: client }, address: 10.97.0.1 }",
     "  b: { labels: { app: server }, address: 10.97.0.2 }"]
for i in range(198):
    y.append(f"  h{i}: {{ labels: {{ app: app{i % 40}, env: {'prod' if i % 2 else 'dev'} }} }}")
y += ["segments:", "  clients: { match: { app: client } }", "  servers: { match: { app: server } }"]
for a in range(40):
    y.append(f"  s{a}: {{ match: {{ app: app{a} }} }}")
y += ["rules:",
      "  - { name: bench, from: [clients], to: [servers], ports: [tcp/5201, icmp] }",
      "  - { name: no-telnet, action: deny, from: [clients], to: [servers], ports: [tcp/23] }",
      "  - { name: client-web, from: [clients], to: [s1, s2, s3], ports: [tcp/443, tcp/8000-8100] }",
      "  - { name: server-dns, from: [servers], to: [s4], ports: [udp/53] }"]
for r in range(296):
    y.append(f"  - {{ name: r{r}, from: [s{random.randrange(40)}], to: [s{random.randrange(40)}], "
             f"ports: [tcp/{random.randrange(1, 60000)}, udp/{random.randrange(1, 60000)}] }}")
open(sys.argv[1], "w").write("\n".join(y) + "\n")
EOF
"$BULKHEAD" policy check "$WORK/policy.yaml" >&2
bulkhead_pair() { # $1 = bulkheadd binary
  local bin=$1
  for h in a b; do
    "$bin" pubkey --state "$WORK/state-$h" >"$WORK/pub-$h"
  done
  for h in a b; do
    "$BULKHEAD" policy compile "$WORK/policy.yaml" "$h" -o json >"$WORK/list-$h.json"
    python3 - "$WORK" "$h" <<'EOF'
import json, sys
work, h = sys.argv[1], sys.argv[2]
lst = json.load(open(f"{work}/list-{h}.json"))[0]
peers = {p: {"public_key": open(f"{work}/pub-{p}").read().strip(),
             "endpoint": "198.18.1.1:51822" if p == "a" else "198.18.1.2:51822"} for p in "ab"}
json.dump({"allowlist": lst, "peers": peers}, open(f"{work}/config-{h}.json", "w"))
EOF
  done
  bg "$A" "$bin" run --state "$WORK/state-a" --interface "bhA$$" --listen-port 51822 --allowlist "$WORK/config-a.json"
  bg "$B" "$bin" run --state "$WORK/state-b" --interface "bhB$$" --listen-port 51822 --allowlist "$WORK/config-b.json"
  sleep 1
}
# With and without the filter, interleaved run by run, so that the machine's drift (large here)
# falls on both alike.
filtered=() unfiltered=() rtt_f="" rtt_u=""
for ((i = 0; i < RUNS; i++)); do
  if want bulkheadd; then
    bulkhead_pair "$BULKHEADD"
    filtered+=("$(one_run 10.97.0.2)")
    [ -n "$rtt_f" ] || rtt_f=$(rtt 10.97.0.2)
    stop_daemons
  fi
  if want unfiltered; then
    bulkhead_pair "$BULKHEADD_UNFILTERED"
    unfiltered+=("$(one_run 10.97.0.2)")
    [ -n "$rtt_u" ] || rtt_u=$(rtt 10.97.0.2)
    stop_daemons
  fi
done
if want bulkheadd; then record "bulkheadd" "$(summarize "$rtt_f" "${filtered[@]}")"; fi
if want unfiltered; then record "bulkheadd, no filter" "$(summarize "$rtt_u" "${unfiltered[@]}")"; fi

# --- report ------------------------------------------------------------------------------------
{
  echo "iperf3 TCP, $RUNS runs of ${SECS}s; ping RTT average of 20; $(nproc) cores; $(date -u +%FT%TZ)"
  printf '%-22s %12s %9s   %s\n' tunnel "median Gb/s" "RTT ms" "runs (Gb/s)"
  for k in "raw veth" wireguard-go boringtun-cli nebula bulkheadd "bulkheadd, no filter"; do
    [ -n "${RESULT[$k]:-}" ] || continue
    read -r med rtt runs <<<"${RESULT[$k]}"
    printf '%-22s %12s %9s   %s\n' "$k" "$med" "$rtt" "$runs"
  done
  python3 - "${RESULT[wireguard-go]:-0}" "${RESULT[boringtun-cli]:-0}" "${RESULT[nebula]:-0}" \
    "${RESULT[bulkheadd]:-0}" "${RESULT[bulkheadd, no filter]:-0}" <<'EOF'
import sys
med = lambda s: float(s.split()[0])
wg, bt, neb, bh, raw = (med(x) for x in sys.argv[1:])
best = max(wg, bt, neb)
print(f"bulkheadd / best userspace peer: {bh / best:.2f}x" if best else "no peer measured")
print(f"filter cost: {100 * (1 - bh / raw):.1f}% of unfiltered throughput" if raw else "")
EOF
}
