#!/usr/bin/env bash
# Data-plane benchmark: iperf3 TCP throughput (1 and 4 streams), retransmits, CPU per GB and ping
# RTT between two network namespaces on a veth, in one run, over:
#   raw            the veth itself
#   wg-go-2022     wireguard-go of the machine's own Debian (12: 0.0.20220316)
#   wg-go          Debian 13's wireguard-go (0.0.20231211: TUN offloads, UDP GSO/GRO)
#   nebula         Debian 13's nebula (1.9)
#   boringtun-cli  boringtun's own daemon (crates.io), the library bulkheadd is built on
#   bulkheadd      with a realistic allowlist (200 identities, 300 rules), its default threads
#                  (one per core: the node split into shards on worker threads, the loop
#                  reading and routing; with one peer, one worker carries it)
#   bulkheadd-1    the same, --threads 1: one thread reads, decides and writes
#   unfiltered     bulkheadd without its filter (a benchmark-only build): what the filter costs
#   baseline       another bulkheadd binary, BASELINE=path (an earlier commit's build): before
#                  and after a change, in the same run
# Runs are interleaved (every tunnel once per round, RUNS rounds), so that the machine's drift
# falls on all alike; the report gives medians.
#
#   bench/dataplane.sh                                  # RUNS=3 rounds, SECS=5 s per iperf3
#   RUNS=5 SECS=10 STREAMS="1 4" bench/dataplane.sh
#   TUNNELS="wg-go bulkheadd" bench/dataplane.sh
#   PROFILE=0 bench/dataplane.sh                        # without the CPU budget
#
# With PROFILE=1 (the default, when perf(1) can record system-wide), one more 1-stream run per
# tunnel is recorded with `perf record -a` (PROFILE_SECS of it), and the report adds where the
# machine's CPU went while that tunnel carried the flow: idle, iperf3 (both ends, with the TCP
# stack it runs), the daemons in the kernel (TUN, UDP, the veth) and in their own code, which for
# bulkheadd is split into the crypto (ChaCha20-Poly1305), the filter (classify, rules, conntrack),
# tun-rs's offload work (GSO split, GRO, checksums) and the rest; each as a share of both cores
# and as CPU seconds per GB carried. On a machine with no idle CPU, throughput is the cores over
# the CPU seconds per GB, so this says what a change to one part could bring at most.
#
# Debian 13's packages come from a second, private apt source list for the `trixie` suite, on
# the same archive as the machine's own apt sources (the URI is read from them), with apt's
# state kept under target/bench-tools/apt: the machine's own apt configuration is not touched.
#
# Needs root. Installs what it needs. Traffic stays inside the two namespaces it creates, on
# 198.18.1.0/24 (RFC 2544's benchmark range), and everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SECS=${SECS:-5}
STREAMS=${STREAMS:-"1 4"}
PROFILE=${PROFILE:-1}
PROFILE_SECS=${PROFILE_SECS:-5}
TUNNELS=${TUNNELS:-"raw wg-go-2022 wg-go nebula boringtun-cli bulkheadd bulkheadd-1 unfiltered"}
want() { [[ " $TUNNELS " == *" $1 "* ]]; }
TOOLS=$PWD/target/bench-tools
WORK=$(mktemp -d /tmp/bulkhead-bench.XXXXXX)
A=bhbA$$
B=bhbB$$
PIDS=()
RESULTS=$WORK/results

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -f /var/run/wireguard/*$$.sock
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '%s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------------
need=()
for pair in iperf3:iperf3 wg:wireguard-tools ping:iputils-ping ip:iproute2 nstat:iproute2; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if want wg-go-2022 && ! command -v wireguard-go >/dev/null; then need+=(wireguard-go); fi
if ((${#need[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
# perf is optional: without it there is no CPU budget, and the rest runs.
if [ "$PROFILE" = 1 ] && ! command -v perf >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf >&2 ||
    log "linux-perf cannot be installed: no CPU budget"
fi

# The URI of the archive that the machine's apt sources use for its own release.
archive_uri() {
  local codename
  # shellcheck disable=SC1091
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  {
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
      awk -v c="$codename" '/^URIs:/ { u = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == c) print u }'
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | sed 's/\[[^]]*\]//' |
      awk -v c="$codename" '$1 == "deb" && $3 == c { print $2 }'
  } | head -n 1 || true
}

# Debian 13's wireguard-go and nebula, unpacked under $TOOLS/trixie.
trixie() {
  local apt=$TOOLS/apt uri
  [ -x "$TOOLS/trixie/usr/bin/wireguard-go" ] && [ -x "$TOOLS/trixie/usr/bin/nebula" ] && return
  # The archive the machine's own sources use for its own Debian release (deb822 or one-line
  # format), never a host written here.
  uri=$(archive_uri)
  [ -n "$uri" ] || { log "no Debian archive in the machine's apt sources"; exit 1; }
  log "fetching Debian 13's wireguard-go and nebula from $uri (suite trixie)"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$TOOLS/trixie"
  cat >"$apt/trixie.sources" <<EOF
Types: deb
URIs: $uri
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  local o=(-o "Dir::Etc::SourceList=$apt/trixie.sources" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Dir::State::Status=/dev/null
    -o APT::Sandbox::User=root)
  apt-get "${o[@]}" update -qq >&2
  (cd "$apt" && rm -f ./*.deb && apt-get "${o[@]}" download wireguard-go nebula >&2)
  for d in "$apt"/*.deb; do
    dpkg-deb -x "$d" "$TOOLS/trixie"
    log "  $(dpkg-deb -f "$d" Package) $(dpkg-deb -f "$d" Version)"
  done
}
if want wg-go || want nebula; then trixie; fi
WG_GO_13=$TOOLS/trixie/usr/bin/wireguard-go
NEBULA=$TOOLS/trixie/usr/bin/nebula
NEBULA_CERT=$TOOLS/trixie/usr/bin/nebula-cert
if want boringtun-cli && [ ! -x "$TOOLS/bin/boringtun-cli" ]; then
  log "installing boringtun-cli from crates.io into $TOOLS"
  cargo install --quiet --locked boringtun-cli --root "$TOOLS" >&2
fi
log "building bulkheadd (release), with and without the filter"
cargo build --quiet --release -p bulkhead-node -p bulkhead-cli >&2
if want unfiltered; then
  cargo build --quiet --release -p bulkhead-node --features bulkhead-dataplane/unfiltered \
    --target-dir target/bench-unfiltered >&2
fi
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

# CPU seconds (user + system) a process has used so far.
cpu_of() {
  awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f\n", ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}
cpu_total() { local t=0 p; for p in "${PIDS[@]}"; do t=$(python3 -c "print($t + $(cpu_of "$p"))"); done; echo "$t"; }
# UDP receive-buffer drops in both namespaces so far.
rcvbuf() { echo $(( $(inA nstat -az UdpRcvbufErrors | awk '/UdpRcvbufErrors/ { print $2 }') + $(inB nstat -az UdpRcvbufErrors | awk '/UdpRcvbufErrors/ { print $2 }') )); }
# Packets dropped by the tunnel interfaces (rx + tx) in both namespaces so far: $1 = a name
# pattern.
tundrops() {
  local n=0 ns
  for ns in "$A" "$B"; do
    n=$((n + $(ip -n "$ns" -s -j link show 2>/dev/null | python3 -c '
import json, sys, re
pat = re.compile(sys.argv[1])
print(sum(l["stats64"]["rx"]["dropped"] + l["stats64"]["tx"]["dropped"]
          for l in json.load(sys.stdin) if pat.fullmatch(l["ifname"])))' "$1")))
  done
  echo "$n"
}
# Average ping RTT to $1 in ms.
rtt() {
  inA ping -q -c 20 -i 0.05 -W 1 "$1" 2>/dev/null | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p'
}

# One measurement of the tunnel $1 to address $2, interface pattern $3: an RTT, then iperf3 with
# each number of streams. Appends "tunnel streams gbps retransmits cpu_s_per_gb rtt_ms
# rcvbuf_errors tun_drops" lines to $RESULTS.
measure() {
  if [ -n "${PROFILING:-}" ]; then profiled "$@"; return; fi
  local name=$1 to=$2 ifpat=$3 n r c0 c1 q0 q1 d0 d1 json
  r=$(rtt "$to"); r=${r:-nan}
  for n in $STREAMS; do
    inB timeout $((SECS + 15)) iperf3 -s -1 >/dev/null 2>&1 &
    local srv=$!
    sleep 0.3
    c0=$(cpu_total); q0=$(rcvbuf); d0=$(tundrops "$ifpat")
    json=$(inA timeout $((SECS + 10)) iperf3 -c "$to" -P "$n" -t "$SECS" -J 2>/dev/null || true)
    c1=$(cpu_total); q1=$(rcvbuf); d1=$(tundrops "$ifpat")
    wait "$srv" 2>/dev/null || true
    python3 -c '
import json, sys
name, n, rtt, c0, c1, q, d = sys.argv[1:8]
try:
    e = json.loads(sys.stdin.read())["end"]
    bps, byts = e["sum_received"]["bits_per_second"], e["sum_received"]["bytes"]
    retr = e["sum_sent"].get("retransmits", 0)
except Exception:
    bps, byts, retr = 0.0, 0, 0
cpu = (float(c1) - float(c0)) / (byts / 1e9) if byts else float("nan")
print(name, n, f"{bps / 1e9:.3f}", retr, f"{cpu:.2f}", rtt, q, d)' \
      "$name" "$n" "$r" "$c0" "$c1" $((q1 - q0)) $((d1 - d0)) <<<"$json" | tee -a "$RESULTS" >&2
  done
}

# One 1-stream run of the tunnel $1 to address $2 under `perf record -a`: PROFILE_SECS recorded,
# from the second second of the flow on. Keeps the samples' command, symbol and object, and the
# bytes iperf3 moved in the recorded seconds.
profiled() {
  local name=$1 to=$2 json
  inB timeout $((PROFILE_SECS + 20)) iperf3 -s -1 >/dev/null 2>&1 &
  local srv=$!
  sleep 0.3
  inA timeout $((PROFILE_SECS + 15)) iperf3 -c "$to" -t $((PROFILE_SECS + 2)) -J >"$WORK/iperf-$name.json" 2>/dev/null &
  local client=$!
  sleep 1
  # cpu-clock, not cycles: an idle CPU counts no cycles, and idle time is part of the budget.
  perf record -q -a -e cpu-clock -F 999 -o "$WORK/perf.data" -- sleep "$PROFILE_SECS" >/dev/null 2>&1 || true
  wait "$client" 2>/dev/null || true
  wait "$srv" 2>/dev/null || true
  perf script -i "$WORK/perf.data" -F comm,ip,sym,dso 2>/dev/null >"$WORK/samples-$name.txt" || true
  python3 -c '
import json, sys
secs = int(sys.argv[1])
try:
    iv = json.load(open(sys.argv[2]))["intervals"]
    print(sum(i["sum"]["bytes"] for i in iv[1:1 + secs]))
except Exception:
    print(0)' "$PROFILE_SECS" "$WORK/iperf-$name.json" >"$WORK/bytes-$name.txt"
  rm -f "$WORK/perf.data"
}

stop_daemons() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  PIDS=()
}

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

# --- nebula ------------------------------------------------------------------------------------
nebula_config() {
  (
    cd "$WORK"
    "$NEBULA_CERT" ca -name bench >/dev/null
    "$NEBULA_CERT" sign -name a -ip 10.98.0.1/24 >/dev/null
    "$NEBULA_CERT" sign -name b -ip 10.98.0.2/24 >/dev/null
    for h in a b; do
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
    done
  )
}
if want nebula; then nebula_config; fi

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
bulkhead_pair() { # $1 = bulkheadd binary, then extra arguments for `bulkheadd run`
  local bin=$1; shift
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
  bg "$A" "$bin" run --state "$WORK/state-a" --interface "bhA$$" --listen-port 51822 --allowlist "$WORK/config-a.json" "$@"
  bg "$B" "$bin" run --state "$WORK/state-b" --interface "bhB$$" --listen-port 51822 --allowlist "$WORK/config-b.json" "$@"
  sleep 1
}

"$BULKHEAD" policy check "$WORK/policy.yaml" >&2

# --- the rounds --------------------------------------------------------------------------------
one() { # $1 = tunnel
  case $1 in
    raw) measure raw 198.18.1.2 'va.*|vb.*' ;;
    wg-go-2022)
      wg_pair wo 51820 env WG_PROCESS_FOREGROUND=1 wireguard-go -f
      measure wg-go-2022 10.99.0.2 'wo.*' ;;
    wg-go)
      wg_pair wn 51820 env WG_PROCESS_FOREGROUND=1 "$WG_GO_13" -f
      measure wg-go 10.99.0.2 'wn.*' ;;
    boringtun-cli)
      wg_pair bt 51821 "$TOOLS/bin/boringtun-cli" -f --disable-drop-privileges
      measure boringtun-cli 10.99.0.2 'bt.*' ;;
    nebula)
      bg "$A" "$NEBULA" -config "$WORK/a.yml"
      bg "$B" "$NEBULA" -config "$WORK/b.yml"
      sleep 1.5
      measure nebula 10.98.0.2 'neb.*' ;;
    bulkheadd)
      bulkhead_pair "$BULKHEADD"
      measure bulkheadd 10.97.0.2 'bh.*' ;;
    bulkheadd-1)
      bulkhead_pair "$BULKHEADD" --threads 1
      measure bulkheadd-1 10.97.0.2 'bh.*' ;;
    unfiltered)
      bulkhead_pair "$BULKHEADD_UNFILTERED"
      measure unfiltered 10.97.0.2 'bh.*' ;;
    baseline)
      bulkhead_pair "${BASELINE:?BASELINE=path of the bulkheadd to compare with}"
      measure baseline 10.97.0.2 'bh.*' ;;
  esac
  stop_daemons
}
: >"$RESULTS"
for ((i = 1; i <= RUNS; i++)); do
  log "round $i of $RUNS"
  for t in $TUNNELS; do one "$t"; done
done

PROFILED=""
if [ "$PROFILE" = 1 ]; then
  if command -v perf >/dev/null && perf record -q -a -o "$WORK/perf-check.data" -- true >/dev/null 2>&1; then
    PROFILED=yes
    log "profiling: one 1-stream run per tunnel, ${PROFILE_SECS}s of it recorded system-wide"
    PROFILING=1
    for t in $TUNNELS; do one "$t"; done
    PROFILING=""
  else
    log "perf is missing or cannot record system-wide here: no CPU budget"
  fi
fi

# --- report ------------------------------------------------------------------------------------
python3 - "$RESULTS" "$RUNS" "$SECS" "$(nproc)" "$TUNNELS" <<'EOF'
import statistics, sys, datetime
path, runs, secs, cores, order = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5].split()
rows = {}
for line in open(path):
    t, n, gbps, retr, cpu, rtt, q, d = line.split()
    rows.setdefault((t, int(n)), []).append((float(gbps), int(retr), float(cpu), float(rtt), int(q), int(d)))
med = lambda xs: statistics.median(xs) if xs else float("nan")
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
print(f"iperf3 TCP, {runs} interleaved rounds of {secs}s per tunnel and stream count; medians; {cores} cores; {now}")
print(f"{'tunnel':<14} {'streams':>7} {'Gbit/s':>7} {'retrans':>8} {'CPU s/GB':>9} {'RTT ms':>7} {'rcvbuf':>7} {'tundrop':>8}   runs (Gbit/s)")
m = {}
for t in order:
    for n in sorted({k[1] for k in rows if k[0] == t}):
        r = rows[(t, n)]
        g = med([x[0] for x in r]); m[(t, n)] = g
        cpu = med([x[2] for x in r])
        print(f"{t:<14} {n:>7} {g:>7.3f} {med([x[1] for x in r]):>8.0f} {cpu:>9.2f} {med([x[3] for x in r]):>7.3f} "
              f"{sum(x[4] for x in r):>7} {sum(x[5] for x in r):>8}   {' '.join(f'{x[0]:.3f}' for x in r)}")
print("CPU s/GB: both ends' daemons, user + system, per GB received. rcvbuf: nstat UdpRcvbufErrors,")
print("tundrop: the tunnel interfaces' rx + tx drops, both summed over the runs.")
for n in sorted({k[1] for k in m}):
    bh = m.get(("bulkheadd", n))
    if not bh:
        continue
    for peer in ("wg-go", "wg-go-2022", "nebula", "boringtun-cli", "baseline", "bulkheadd-1", "raw"):
        if m.get((peer, n)):
            # Each round's own ratio too: a round runs every tunnel under the same conditions, so
            # the median of per-round ratios holds up better when the machine drifts.
            pairs = [(x[0], y[0]) for x, y in zip(rows[("bulkheadd", n)], rows[(peer, n)]) if y[0]]
            rr = med([x / y for x, y in pairs])
            print(f"{n} stream(s): bulkheadd / {peer} = {bh / m[(peer, n)]:.2f}x (median of per-round ratios {rr:.2f}x)")
    if m.get(("unfiltered", n)):
        print(f"{n} stream(s): filter cost = {100 * (1 - bh / m[('unfiltered', n)]):.1f}% of unfiltered throughput")
EOF

# --- the CPU budget of the profiled runs ---------------------------------------------------------
if [ -n "$PROFILED" ]; then
  python3 - "$WORK" "$PROFILE_SECS" "$(nproc)" "$TUNNELS" <<'EOF'
import re, sys
work, secs, cores, order = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()
line = re.compile(r"^\s*(.+?)\s+([0-9a-f]+)\s+(.*?)\s+\((.*)\)$")
DAEMONS = ("bulkheadd", "wireguard-go", "nebula", "boringtun", "tokio")
# bulkheadd's own code, by symbol: the first pattern that matches names the part.
PARTS = [("crypto", re.compile(r"chacha|poly1305|aead", re.I)),
         ("filter", re.compile(r"bulkhead_dataplane::(filter|conntrack|packet::classify|node::classify|node::admit)|bulkhead_allowlist")),
         ("offload", re.compile(r"tun_rs::platform::linux::(offload|checksum)|__memcmp"))]
COLS = ["idle", "iperf3", "kernel", "crypto", "filter", "offload", "other", "rest"]
print()
print(f"CPU budget: one 1-stream run per tunnel, {secs}s recorded with perf record -a; % of {cores} cores, and CPU s per GB carried")
print(f"{'tunnel':<14} {'Gbit/s':>7} " + " ".join(f"{c:>14}" for c in COLS))
for t in order:
    try:
        byts = int(open(f"{work}/bytes-{t}.txt").read())
        rows = open(f"{work}/samples-{t}.txt").read().splitlines()
    except OSError:
        continue
    n = {c: 0 for c in COLS}
    total = 0
    for r in rows:
        m = line.match(r)
        if not m:
            continue
        comm, ip, sym, dso = m.groups()
        total += 1
        if comm.startswith("swapper"):
            c = "idle"
        elif comm.startswith("iperf3"):
            c = "iperf3"
        elif comm.startswith(DAEMONS):
            # Kernel text, modules (tun, veth) included, by address: the upper half.
            if int(ip, 16) >= 0xffff800000000000:
                c = "kernel"
            else:
                c = next((p for p, rx in PARTS if "bulkhead" in t + comm and rx.search(sym)), "other")
        else:
            c = "rest"
        n[c] += 1
    if not total or not byts:
        print(f"{t:<14} (no samples or no bytes)")
        continue
    gb = byts / 1e9
    gbps = 8 * gb / secs
    cell = lambda c: f"{100 * n[c] / total:5.1f}% {n[c] / total * cores * secs / gb:6.2f}s"
    print(f"{t:<14} {gbps:>7.3f} " + " ".join(f"{cell(c):>14}" for c in COLS))
    busy = total - n["idle"]
    if t.startswith("bulkheadd") and busy:
        own = n["filter"] + n["offload"] + n["other"]
        print(f"{'':<14} if bulkheadd's own code but the crypto cost nothing: at most {gbps * busy / (busy - own):.3f} Gbit/s "
              f"(the machine {100 * busy / total:.0f}% busy)")
print("idle: no task; iperf3: both ends, in the kernel too (TCP); kernel: the daemons' system time (TUN, UDP, the veth,")
print("and the TCP receive path a TUN write runs); crypto, filter, offload, other: the daemons' own code (bulkheadd only;")
print("by symbol, so code inlined into a caller counts as the caller's: the filter's share is a lower bound;")
print("other Go and C daemons are all 'other'); rest: everything else on the machine (softirq threads, perf).")
EOF
fi
