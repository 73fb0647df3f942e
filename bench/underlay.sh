#!/usr/bin/env bash
# Underlay firewall benchmark (issue 14), two figures:
#
# 1. What the host firewall's table (`inet bulkhead`, spec §7) costs the underlay: iperf3 TCP
#    throughput from a client namespace to a server namespace over their underlay addresses, with
#    a standalone bulkheadd in each, in three variants interleaved round by round:
#      none    both daemons in `mode: off`: no `inet bulkhead` table (the overlay guard, which
#              every daemon installs whatever the mode, is there in every variant);
#      server  the server in `enforce`, iperf3 let in by an inbound allow entry: after the
#              handshake its packets take the `ct state established,related accept` fast path;
#      both    the client in `enforce` too, iperf3 let out by an outbound allow entry.
#    An optional variant `ct` (VARIANTS="none server both ct") puts a one-rule table on the
#    server instead (`ct state established,related accept`): connection tracking alone, to tell
#    its cost from that of bulkhead's rules.
#    Throughput on a small machine drifts by more than the table costs, so with PROFILE=1 (the
#    default, when perf(1) works) one more run per variant is profiled system-wide, and the
#    share of the flow's CPU time (iperf3's and the softirq threads') spent in netfilter
#    (connection tracking, nft rules, hooks) is reported: the table's cost per byte, whatever
#    the noise. OFFLOADS=off turns TSO, GSO and GRO off on the veth pair, so that every
#    1500-byte packet crosses the hooks (the worst case; by default, as on real NICs, a hook
#    mostly sees 64 KB aggregates).
# 2. How long from a mode change to the table in place: the server's configuration file is
#    rewritten (observe <-> enforce), the daemon gets SIGHUP, and `nft list table inet bulkhead`
#    is polled every POLL_MS until it shows the new mode's last rule. With CONTROLLER=1 (the
#    default) the same through a controller: `cargo bench --bench propagation` with
#    BH_ONLY=underlay times `bulkhead policy apply` of a policy whose `underlay` mode changes
#    until every node's table shows it.
#
#   bench/underlay.sh                              # ROUNDS=5 rounds of SECS=10 s, FLIPS=20
#   ROUNDS=3 SECS=5 FLIPS=10 CONTROLLER=0 bench/underlay.sh
#   OFFLOADS=off VARIANTS="none server both ct" FLIPS=0 CONTROLLER=0 bench/underlay.sh
#
# Needs root. Installs iperf3 and nftables if missing. Traffic stays between the two namespaces
# it creates, on 198.18.1.0/24 (RFC 2544's benchmark range); the namespaces, and with them their
# tables, are removed on exit, failure included.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-10}
FLIPS=${FLIPS:-20}
POLL_MS=${POLL_MS:-5}
CONTROLLER=${CONTROLLER:-1}
CONTROLLER_RUNS=${CONTROLLER_RUNS:-10}
VARIANTS=${VARIANTS:-"none server both"}
PROFILE=${PROFILE:-1}
PROFILE_SECS=${PROFILE_SECS:-5}
OFFLOADS=${OFFLOADS:-on}
COMMAND="ROUNDS=$ROUNDS SECS=$SECS VARIANTS=\"$VARIANTS\" OFFLOADS=$OFFLOADS PROFILE=$PROFILE"
COMMAND+=" PROFILE_SECS=$PROFILE_SECS FLIPS=$FLIPS POLL_MS=$POLL_MS CONTROLLER=$CONTROLLER"
COMMAND+=" CONTROLLER_RUNS=$CONTROLLER_RUNS $0 $*"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
WORK=$(mktemp -d /tmp/bulkhead-underlay.XXXXXX)
C=bhuC$$ # client namespace
S=bhuS$$ # server namespace
C_ADDR=198.18.1.1
S_ADDR=198.18.1.2
PIDS=()
declare -A DAEMON

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  # The enforcing table outlives its daemon by design; it goes with its namespace.
  ip netns del "$C" 2>/dev/null || true
  ip netns del "$S" 2>/dev/null || true
  rm -f "/var/run/wireguard/bhuc$$.sock" "/var/run/wireguard/bhus$$.sock"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '%s\n' "$*" >&2; }
die() { log "underlay.sh: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, nftables)"

# --- tools -------------------------------------------------------------------------------------
need=()
tools=(iperf3:iperf3 nft:nftables ip:iproute2 python3:python3)
[ "$OFFLOADS" = on ] || tools+=(ethtool:ethtool)
for pair in "${tools[@]}"; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  log "installing ${need[*]}"
  # iperf3's package asks whether to start a system-wide server: no.
  echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections 2>/dev/null || true
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# Release binaries, rebuilt if missing or older than a source file.
BULKHEAD=$PWD/target/release/bulkhead
BULKHEADD=$PWD/target/release/bulkheadd
BINARIES="release, up to date"
stale() {
  [[ -x $BULKHEADD && -x $BULKHEAD ]] || return 0
  [ -n "$(find . -path ./target -prune -o \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) \
            -newer "$BULKHEADD" -print -quit)" ]
}
if stale; then
  log "building the release binaries (cargo build --release --bins)"
  if ! cargo build --quiet --release --bins >&2; then
    [[ -x $BULKHEADD && -x $BULKHEAD ]] || die "the build failed and there are no binaries"
    BINARIES="release, STALE: the build failed, the binaries from $(date -r "$BULKHEADD" -u +%FT%TZ) were used"
    log "WARNING: $BINARIES"
  fi
fi

# --- the two hosts -----------------------------------------------------------------------------
ip netns add "$C"
ip netns add "$S"
ip link add "ulc$$" netns "$C" type veth peer name "uls$$" netns "$S"
ip -n "$C" addr add "$C_ADDR/24" dev "ulc$$"
ip -n "$S" addr add "$S_ADDR/24" dev "uls$$"
for ns in "$C" "$S"; do ip -n "$ns" link set lo up; done
ip -n "$C" link set "ulc$$" up
ip -n "$S" link set "uls$$" up
if [ "$OFFLOADS" != on ]; then
  ip netns exec "$C" ethtool -K "ulc$$" tso off gso off gro off
  ip netns exec "$S" ethtool -K "uls$$" tso off gso off gro off
fi
inC() { ip netns exec "$C" "$@"; }
inS() { ip netns exec "$S" "$@"; }
# Starts a process in a namespace; `ip netns exec` execs it, so $! is the process itself.
bg() { local ns=$1; shift; ip netns exec "$ns" "$@" >>"$WORK/daemons.log" 2>&1 & PIDS+=($!); }

# Each host's allowlist, compiled from a two-identity policy, and its configuration in each
# mode: off (no underlay block), observe, enforce. The server lets iperf3 in from the client;
# the client lets iperf3 out to the server; each knows the other as an enrolled server.
cat >"$WORK/policy.yaml" <<'EOF'
version: 1
network: { name: ulbench, cidr: 10.96.0.0/24 }
identities:
  client: { labels: { role: client } }
  server: { labels: { role: server } }
segments:
  clients: { match: { role: client } }
  servers: { match: { role: server } }
rules:
  - { name: iperf, from: [clients], to: [servers], ports: [tcp/5201] }
EOF
for h in client server; do
  "$BULKHEAD" policy compile "$WORK/policy.yaml" "$h" -o json >"$WORK/list-$h.json"
done
python3 - "$WORK" "$C_ADDR" "$S_ADDR" <<'EOF'
import json, sys
work, c_addr, s_addr = sys.argv[1:]
iperf = [{"proto": "tcp", "lo": 5201, "hi": 5201}]
host = lambda a: [{"address": a, "prefix_len": 32}]
ends = {"client": (c_addr, s_addr, "server"), "server": (s_addr, c_addr, "client")}
for h, (me, other, other_name) in ends.items():
    lst = json.load(open(f"{work}/list-{h}.json"))[0]
    for mode in ("off", "observe", "enforce"):
        underlay = None
        if mode != "off":
            underlay = {"mode": mode, "servers": {other: other_name}, "controllers": [],
                        "inbound": [], "outbound": []}
            if h == "server":
                underlay["inbound"] = [{"name": "iperf", "nets": host(other), "ports": iperf}]
            else:
                underlay["outbound"] = [{"name": "iperf", "nets": host(other), "ports": iperf}]
        cfg = {"allowlist": lst, "peers": {}, "underlay": underlay}
        json.dump(cfg, open(f"{work}/{h}-{mode}.json", "w"))
EOF
cp "$WORK/client-off.json" "$WORK/client.json"
cp "$WORK/server-off.json" "$WORK/server.json"
bg "$C" "$BULKHEADD" run --state "$WORK/state-client" --interface "bhuc$$" --listen-port 51820 \
  --allowlist "$WORK/client.json"
DAEMON[client]=$!
bg "$S" "$BULKHEADD" run --state "$WORK/state-server" --interface "bhus$$" --listen-port 51820 \
  --allowlist "$WORK/server.json"
DAEMON[server]=$!

# `nft list table inet bulkhead` on a host (client|server); fails if there is none.
table() { ip netns exec "$([ "$1" = client ] && echo "$C" || echo "$S")" nft list table inet bulkhead 2>/dev/null; }
# Whether a host's table is the one of mode $2.
in_mode() {
  case $2 in
    off) ! table "$1" >/dev/null ;;
    observe) table "$1" | grep -q 'comment "would deny"' ;;
    enforce) table "$1" | grep -q 'drop comment "default deny"' ;;
  esac
}
# Puts host $1 in mode $2: a new configuration file (renamed into place), SIGHUP, and a wait (at
# most 10 s) for the table.
set_mode() {
  local h=$1 mode=$2 i
  in_mode "$h" "$mode" && return 0
  cp "$WORK/$h-$mode.json" "$WORK/$h.json.new"
  mv "$WORK/$h.json.new" "$WORK/$h.json"
  kill -HUP "${DAEMON[$h]}"
  for ((i = 0; i < 200; i++)); do
    in_mode "$h" "$mode" && return 0
    sleep 0.05
  done
  die "$h: no $mode table after 10 s; daemon log: $(tail -20 "$WORK/daemons.log")"
}
# The daemons are up once each has its guard table (installed at start, whatever the mode).
for ((i = 0; i < 100; i++)); do
  inC nft list table inet bulkhead-overlay >/dev/null 2>&1 &&
    inS nft list table inet bulkhead-overlay >/dev/null 2>&1 && break
  kill -0 "${DAEMON[client]}" "${DAEMON[server]}" || die "a daemon died: $(cat "$WORK/daemons.log")"
  sleep 0.1
done
((i < 100)) || die "the daemons did not start: $(cat "$WORK/daemons.log")"

# --- 1. throughput -----------------------------------------------------------------------------
# The variant's tables: set_variant none|server|both|ct.
set_variant() {
  inS nft delete table inet bhbench_ct 2>/dev/null || true
  case $1 in
    none) set_mode server off; set_mode client off ;;
    server) set_mode server enforce; set_mode client off ;;
    both) set_mode server enforce; set_mode client enforce ;;
    ct)
      set_mode server off; set_mode client off
      inS nft -f - <<'EOF'
table inet bhbench_ct {
  chain input { type filter hook input priority filter; policy accept; ct state established,related accept; }
  chain output { type filter hook output priority filter; policy accept; ct state established,related accept; }
}
EOF
      ;;
    *) die "unknown variant $1 (none, server, both, ct)" ;;
  esac
}

bg "$S" iperf3 -s -B "$S_ADDR"
IPERF=$!
sleep 0.5
kill -0 "$IPERF" || die "iperf3 -s did not start: $(cat "$WORK/daemons.log")"
# One iperf3 run (the first second, slow start, left out): prints bits per second.
one_run() {
  inC timeout $((SECS + 15)) iperf3 -c "$S_ADDR" -t "$SECS" -O 1 -J 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])' \
      2>/dev/null || echo 0
}

read -r -a variants <<<"$VARIANTS"
declare -A RUNS_OF
log "throughput: $ROUNDS rounds x ${#variants[@]} variants x ${SECS}s"
for ((r = 0; r < ROUNDS; r++)); do
  # Each round starts with another variant, so that none is always measured first.
  for ((k = 0; k < ${#variants[@]}; k++)); do
    v=${variants[$(((r + k) % ${#variants[@]}))]}
    set_variant "$v"
    sleep 0.3
    bps=$(one_run)
    [ "$bps" != 0 ] || die "iperf3 failed in variant $v: the flow was dropped?"
    RUNS_OF[$v]+="$bps "
    # The server's table with its counters after the run: the flow took the allow entry.
    [ "$v" = none ] || [ "$v" = ct ] || table server >"$WORK/table-after-$v.txt"
    log "  round $((r + 1)) $v: $(python3 -c "print(f'{$bps / 1e9:.2f}')") Gbit/s"
  done
done
for v in server both; do
  [ -s "$WORK/table-after-$v.txt" ] || continue
  log "the server's table after the last '$v' run, as the kernel holds it:"
  cat "$WORK/table-after-$v.txt" >&2
  break
done

# One more run per variant under `perf record -a`: where the CPU time went.
PROFILED=""
if [ "$PROFILE" = 1 ]; then
  if command -v perf >/dev/null && perf record -q -a -o "$WORK/perf-check.data" -- true >/dev/null 2>&1; then
    PROFILED=yes
    log "profiling: one run of $((PROFILE_SECS + 2))s per variant, ${PROFILE_SECS}s of it recorded"
    for v in "${variants[@]}"; do
      set_variant "$v"
      sleep 0.3
      inC timeout $((PROFILE_SECS + 15)) iperf3 -c "$S_ADDR" -t $((PROFILE_SECS + 2)) >/dev/null 2>&1 &
      client=$!
      sleep 1
      perf record -q -a -F 999 -o "$WORK/perf-$v.data" -- sleep "$PROFILE_SECS" >/dev/null 2>&1 || true
      wait "$client" || die "iperf3 failed while profiling variant $v"
      # The flow's samples (iperf3 and the softirq threads: on a veth the receiving side runs
      # mostly in the sender's context), and among them connection tracking, nft's rule
      # evaluation and the other netfilter functions (the hooks). Other processes on the
      # machine do not count, so the shares hold on a busy machine too.
      perf report -i "$WORK/perf-$v.data" --sort comm,sym --stdio 2>/dev/null | awk '
        $2 ~ /^(iperf3|ksoftirqd)/ { p = $1 + 0; s = $4; flow += p
          if ($3 != "[k]") next
          if (s ~ /conntrack|^nf_ct|^__nf_ct|^nf_confirm/) ct += p
          else if (s ~ /^nft_|^__nft/) nft += p
          else if (s ~ /^nf_|^__nf_/) nf += p }
        END { printf "%.3f %.3f %.3f %.3f\n", ct, nft, nf, flow }' >"$WORK/profile-$v.txt"
    done
  else
    log "perf is missing or cannot record system-wide here: no profile"
  fi
fi
set_variant none

# --- 2. mode change -> table in place (standalone, SIGHUP) -------------------------------------
: >"$WORK/flips.txt"
if ((FLIPS > 0)); then
  set_mode server observe
  sleep 0.3
  log "SIGHUP: $FLIPS mode changes on the server, nft polled every ${POLL_MS} ms"
  # Runs in the server's namespace: per flip, the new file renamed into place, then the clock
  # starts, SIGHUP, and nft is polled (at most 5 s) until the table shows the new mode; the time is
  # taken after the poll that saw it, an upper bound. `nft monitor` runs alongside and timestamps
  # the kernel's notification of the new table's last rule: when the batch was committed.
  inS python3 - "$WORK" "${DAEMON[server]}" "$FLIPS" "$POLL_MS" >"$WORK/flips.txt" <<'EOF'
import os, shutil, signal, subprocess, sys, threading, time
work, pid, flips, poll_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
want = {"enforce": 'drop comment "default deny"', "observe": 'comment "would deny"'}
def listed(times):
    t = time.monotonic()
    o = subprocess.run(["nft", "list", "table", "inet", "bulkhead"], capture_output=True, text=True)
    times.append((time.monotonic() - t) * 1e3)
    return o.stdout if o.returncode == 0 else ""
idle_ms, poll_times = [], []
for _ in range(10):
    listed(idle_ms)
events = []  # (time, line) of each rule nft monitor reports
monitor = subprocess.Popen(["nft", "monitor", "rules"], stdout=subprocess.PIPE, text=True, bufsize=1)
def read_events():
    for line in monitor.stdout:
        events.append((time.monotonic(), line))
threading.Thread(target=read_events, daemon=True).start()
time.sleep(0.3)
for i in range(flips):
    mode = "enforce" if i % 2 == 0 else "observe"
    shutil.copy(f"{work}/server-{mode}.json", f"{work}/server.json.new")
    os.replace(f"{work}/server.json.new", f"{work}/server.json")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGHUP)
    polled = None
    while time.monotonic() - t0 < 5:
        text = listed(poll_times)
        if want[mode] in text and (mode == "observe" or want["observe"] not in text):
            polled = (time.monotonic() - t0) * 1e3
            break
        time.sleep(poll_ms / 1e3)
    if polled is None:
        monitor.kill()
        sys.exit(f"flip {i} to {mode}: not in place after 5 s")
    time.sleep(0.25)
    # The output chain comes last in the batch: its last rule means the whole table.
    seen = [t for t, l in list(events)
            if t >= t0 and "add rule inet bulkhead output" in l and want[mode] in l]
    event = f"{(seen[0] - t0) * 1e3:.1f}" if seen else "nan"
    print(mode, f"{polled:.1f}", event)
monitor.kill()
med = lambda v: sorted(v)[len(v) // 2] if v else float("nan")
print("nft", f"{med(idle_ms):.1f}", f"{med(poll_times):.1f}")
EOF
fi

# --- 2b. the same through a controller ---------------------------------------------------------
CONTROLLER_LINES=""
if [ "$CONTROLLER" = 1 ]; then
  log "controller: cargo bench -p bulkhead-e2e --bench propagation (BH_ONLY=underlay, BH_RUNS=$CONTROLLER_RUNS)"
  if out=$(BH_ONLY=underlay BH_RUNS=$CONTROLLER_RUNS timeout 900 \
             cargo bench --quiet -p bulkhead-e2e --bench propagation 2>"$WORK/bench.err"); then
    CONTROLLER_LINES=$(grep '^underlay' <<<"$out" || true)
  else
    log "the propagation bench failed: $(tail -20 "$WORK/bench.err")"
  fi
  [ -n "$CONTROLLER_LINES" ] || CONTROLLER_LINES="(no figure: see above)"
fi

# --- report ------------------------------------------------------------------------------------
{
  echo
  echo "=== bench/underlay.sh summary ==="
  echo "command:  $COMMAND"
  echo "date:     $(date -u +%FT%TZ)"
  echo "kernel:   $(uname -r); $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
  echo "load:     at start $LOAD_START; at the end $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min; other work on the machine skews throughput)"
  echo "tools:    $(nft --version); $(iperf3 --version | head -1)"
  echo "source:   $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes'); binaries: $BINARIES"
  echo
  echo "1. iperf3 TCP client -> server over the underlay (veth, offloads $OFFLOADS), $ROUNDS interleaved rounds of ${SECS}s"
  args=()
  for v in "${variants[@]}"; do
    args+=("$v=${RUNS_OF[$v]}=$(cat "$WORK/profile-$v.txt" 2>/dev/null || true)")
  done
  python3 - "$PROFILED" "$PROFILE_SECS" "${args[@]}" <<'EOF'
import statistics, sys
profiled, profile_secs = sys.argv[1] == "yes", sys.argv[2]
runs, prof = {}, {}
for a in sys.argv[3:]:
    name, vals, p = a.split("=", 2)
    runs[name] = [float(x) / 1e9 for x in vals.split()]
    if p.strip():
        prof[name] = [float(x) for x in p.split()]
label = {"none": "no table (mode off)", "server": "server enforce",
         "both": "server + client enforce", "ct": "conntrack only (1 rule)"}
print(f"   {'variant':<26}{'median Gb/s':>12}   runs (Gb/s)")
for name, r in runs.items():
    print(f"   {label.get(name, name):<26}{statistics.median(r):>12.2f}   {' '.join(f'{x:.2f}' for x in r)}")
if "none" in runs:
    base = runs["none"]
    for name, r in runs.items():
        if name == "none":
            continue
        ratio = statistics.median(r) / statistics.median(base)
        # Paired: this variant's run over the same round's run without a table.
        pairs = [x / b for x, b in zip(r, base)]
        paired = statistics.median(pairs)
        print(f"   {label.get(name, name)} / no table: {ratio:.3f} (loss {100 * (1 - ratio):.1f}%);"
              f" per round {min(pairs):.3f}..{max(pairs):.3f}, median {paired:.3f}"
              f" (loss {100 * (1 - paired):.1f}%)")
    spread = (max(base) - min(base)) / statistics.median(base)
    print(f"   noise: the no-table runs alone spread over {100 * spread:.0f}% of their median")
if profiled and prof:
    print(f"   CPU profile (perf record -a, {profile_secs}s per variant), % of the flow's CPU time"
          " (iperf3 and softirq threads):")
    print(f"   {'variant':<26}{'conntrack':>10}{'nft rules':>10}{'other nf':>10}{'netfilter':>10}")
    share = {}
    for name, (ct, nft, nf, flow) in prof.items():
        f = max(flow, 1e-9) / 100
        share[name] = (ct + nft + nf) / f
        print(f"   {label.get(name, name):<26}{ct / f:>10.2f}{nft / f:>10.2f}{nf / f:>10.2f}"
              f"{share[name]:>10.2f}")
    if "none" in share:
        for name in share:
            if name != "none":
                print(f"   {label.get(name, name)}: netfilter takes {share[name] - share['none']:.1f}"
                      " points more of the flow's CPU time than with no table")
EOF
  echo
  echo "2. mode change observe <-> enforce -> table in place (nft polled every ${POLL_MS} ms)"
  python3 - "$WORK/flips.txt" <<'EOF'
import math, statistics, sys
polled, event, nft = {}, {}, None
for line in open(sys.argv[1]):
    k, a, b = line.split()
    if k == "nft":
        nft = (a, b)
        continue
    polled.setdefault(k, []).append(float(a))
    if not math.isnan(float(b)):
        event.setdefault(k, []).append(float(b))
if not polled:
    print("   not measured (FLIPS=0)")
fmt = lambda v: f"median {statistics.median(v):6.1f} ms, max {max(v):6.1f} ms ({len(v)} runs)"
if polled:
    print("   standalone daemon, new file + SIGHUP:")
for mode in ("enforce", "observe"):
    if mode in polled:
        print(f"     -> {mode:<8} as polled:           {fmt(polled[mode])}")
    if mode in event:
        print(f"     -> {mode:<8} committed (monitor): {fmt(event[mode])}")
if nft:
    print(f"     one 'nft list table' takes {nft[0]} ms idle, {nft[1]} ms while polling (medians)")
EOF
  if [ "$CONTROLLER" = 1 ]; then
    echo "   controller, 'bulkhead policy apply' -> every node's table (3 nodes):"
    sed 's/^/   /' <<<"$CONTROLLER_LINES"
  fi
}
