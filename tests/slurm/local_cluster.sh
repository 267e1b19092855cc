#!/usr/bin/env bash
# A Slurm cluster on this one machine for the tests, from Debian's packages (slurm-wlm 22.05 + munge):
#
#   partition debug    (default)  this host as one node: the one-node tests
#   partition twonode             two nodes, clnode1 and clnode2, each a slurmd in its own network namespace with its
#                                 own host name and address on a private bridge: multi-node jobs, whose ranks talk
#                                 over a real network interface (eth0 inside each node) as on a cluster
#
#   tests/slurm/local_cluster.sh start            install what is missing, configure, start, wait until usable
#   tests/slurm/local_cluster.sh stop             stop the daemons THIS script started (by its pid files) and remove
#                                                 the bridge, namespaces and /etc/hosts lines it made
#   tests/slurm/local_cluster.sh status [PART]    exit 0 when a cluster answers and every node of partition PART
#                                                 (default: the one-node partition) is usable
#
# If a cluster this script did not configure already answers, `start` uses it and starts nothing (so `stop` stops
# nothing). `start` is idempotent: it starts what is missing and restarts the daemons only when slurm.conf changed
# (a restart, not `scontrol reconfigure`, which does not apply every setting; job state survives in StateSaveLocation).
# When slurmctld is not running, it starts with an empty queue: jobs saved by daemons that died without `stop` are
# dropped, not rerun or left holding the node.
# Every node advertises $CLUSTERLAB_FAKE_GPUS (default 2) fake GPUs backed by placeholder character devices, so GPU
# directives are accepted and scheduled; jobs find no CUDA and run on the CPU. The three nodes share this machine's
# cores and memory. Needs root and apt; otherwise it exits 3 with the reason, and the Slurm tests skip (or fail, with
# CLUSTERLAB_REQUIRE_SLURM=1). Without network namespaces (no CAP_NET_ADMIN), or with CLUSTERLAB_SLURM_TWO_NODES=0,
# only the one-node partition comes up and the two-node tests skip or fail the same way, with the reason.
set -euo pipefail
STATE=${CLUSTERLAB_SLURM_DIR:-/var/tmp/clusterlab-slurm}
PARTITION=${CLUSTERLAB_SLURM_PARTITION:-debug}
TWO_NODE_PARTITION=${CLUSTERLAB_SLURM_TWO_NODE_PARTITION:-twonode}
# The bridge's /24: this host is .1, clnode1 .11, clnode2 .12. Change it if it collides with a network of yours.
NET=${CLUSTERLAB_SLURM_NET:-10.77.0}
NGPU=${CLUSTERLAB_FAKE_GPUS:-2}
HOST=$(hostname -s)
NODES=(clnode1 clnode2)
BRIDGE=clusterlab-br
HOSTS_MARK="# added by clusterlab tests/slurm/local_cluster.sh"
say() { echo "[local_cluster $(date +%T)] $*"; }
# A killed daemon whose parent has not reaped it yet is a zombie: kill -0 still succeeds, but it is gone.
running() { local stat; stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; stat=${stat##*) }; [ "${stat:0:1}" != Z ]; }
alive() { [ -s "$1" ] && running "$(cat "$1")"; }
ours() { grep -qs "^# written by clusterlab" /etc/slurm/slurm.conf; }
node_ip() { echo "$NET.$((10 + $1))"; }        # node_ip 1 -> 10.77.0.11
netns_of() { echo "clusterlab-$1"; }           # the network namespace of a node
veth_of() { echo "cl-$1"; }                    # the host's end of a node's cable (eth0 is the node's end)
in_node() { local node=$1; shift; nsenter --net="/run/netns/$(netns_of "$node")" "$@"; }   # run a command on a node

# Every node of partition $1 answers and can take jobs (`idle*` means not responding yet: not ready).
partition_ready() {
  local states
  states=$(sinfo -h -N -p "$1" -o %t 2>/dev/null) || return 1
  [ -n "$states" ] && ! grep -qvxE 'idle|mix|alloc|comp' <<< "$states"
}
cluster_up() { scontrol ping 2>/dev/null | grep -q UP && partition_ready "${1:-$PARTITION}"; }

# Stop the daemons whose pid files are given, all at once (a slurmd takes about 2 s to go), and remove the files.
stop_pids() {
  local file pid pids=()
  for file in "$@"; do
    pid=$(cat "$file" 2>/dev/null) || continue
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  for _ in $(seq 40); do any_alive ${pids[@]+"${pids[@]}"} || break; sleep 0.25; done
  for pid in ${pids[@]+"${pids[@]}"}; do running "$pid" && kill -KILL "$pid"; done
  rm -f "$@"
}
any_alive() { local pid; for pid in "$@"; do running "$pid" && return 0; done; return 1; }

install_packages() {
  local missing=() p
  # iproute2 for the two-node partition's namespaces; the one-node cluster needs only the first four
  for p in slurmctld slurmd slurm-client munge iproute2; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { echo "no apt-get: cannot install ${missing[*]}" >&2; exit 3; }
  say "installing ${missing[*]}"
  apt-get update -qq
  # No systemd here: keep the packages' scripts from starting services; we start the daemons ourselves.
  local own_policy=0
  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

# ---- the two-node partition's network --------------------------------------------------------------------------
# A bridge on this host (address .1, where the nodes reach slurmctld) and, per node, a network namespace holding the
# node's end of a veth pair, named eth0, with the node's address. Namespaces rather than Slurm's multiple-slurmd
# mode: that mode would put both nodes on 127.0.0.1, so rendezvous by host name and collectives over a real
# interface (what breaks first on a cluster) would never be exercised. Every name here belongs to this script.
# Sets TWO_NODE=1, or TWO_NODE=0 and TWO_NODE_REASON (the one-node partition comes up either way).
make_network() {
  TWO_NODE=0
  if [ "${CLUSTERLAB_SLURM_TWO_NODES:-1}" = 0 ]; then
    TWO_NODE_REASON="CLUSTERLAB_SLURM_TWO_NODES=0"; return 0
  fi
  if ! command -v ip >/dev/null || ! command -v nsenter >/dev/null; then
    TWO_NODE_REASON="no ip (iproute2) or nsenter (util-linux)"; return 0
  fi
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    if ! { ip link add "$BRIDGE" type bridge && ip addr add "$NET.1/24" dev "$BRIDGE" && ip link set "$BRIDGE" up; } 2>/dev/null; then
      TWO_NODE_REASON="cannot create the bridge $BRIDGE (needs CAP_NET_ADMIN)"; return 0
    fi
  fi
  local i
  for i in 1 2; do
    [ -e "/run/netns/$(netns_of "${NODES[i - 1]}")" ] || make_node_network "$i" 2>/dev/null \
      || { TWO_NODE_REASON="cannot create the network namespace of ${NODES[i - 1]}"; return 0; }
    # The node names must resolve everywhere to the node addresses: srun, MASTER_ADDR and gloo go by name.
    grep -q "^$(node_ip "$i") ${NODES[i - 1]} " /etc/hosts || echo "$(node_ip "$i") ${NODES[i - 1]} $HOSTS_MARK" >> /etc/hosts
  done
  TWO_NODE=1
}

make_node_network() {
  local node=${NODES[$1 - 1]} ns
  ns=$(netns_of "$node")
  ip netns add "$ns" \
    && ip link add "$(veth_of "$node")" type veth peer name eth0 netns "$ns" \
    && ip link set "$(veth_of "$node")" master "$BRIDGE" up \
    && ip -n "$ns" addr add "$(node_ip "$1")/24" dev eth0 \
    && ip -n "$ns" link set eth0 up \
    && ip -n "$ns" link set lo up
}

remove_network() {
  local node ns
  for node in "${NODES[@]}"; do
    ns=$(netns_of "$node")
    [ -e "/run/netns/$ns" ] && ip netns del "$ns"
    # the veth pair dies with its namespace, asynchronously: wait, so that an immediate `start` can recreate it
    for _ in $(seq 20); do ip link show "$(veth_of "$node")" >/dev/null 2>&1 || break; sleep 0.1; done
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
  if grep -q "$HOSTS_MARK" /etc/hosts; then
    # rewritten in place, not with sed -i: /etc/hosts is often a bind mount that cannot be replaced
    local kept
    kept=$(grep -v "$HOSTS_MARK" /etc/hosts)
    printf '%s\n' "$kept" > /etc/hosts
  fi
}

# slurmd of node $1 (1 or 2) inside its namespace, with its own host name (a UTS namespace), as on a real node:
# socket.gethostname(), Slurm's SLURMD_NODENAME and the address gloo binds to all agree.
# nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup filesystem slurmd needs at start.
start_node_slurmd() {
  local node=${NODES[$1 - 1]}
  mkdir -p "$STATE/spool/$node"
  in_node "$node" unshare --uts sh -c "hostname $node && exec /usr/sbin/slurmd -N $node"
}

# The nodes must reach each other, not only slurmctld: a host whose bridge traffic passes a firewall that drops
# forwarded packets (br_netfilter with a DROP policy, as Docker sets up) would let jobs start and hang in the
# rendezvous. clnode1 opens a TCP connection to clnode2's slurmd.
nodes_connected() {
  in_node "${NODES[0]}" timeout 3 bash -c "exec 3<>/dev/tcp/$(node_ip 2)/6818" 2>/dev/null
}

# ---- configuration -----------------------------------------------------------------------------------------------
# Writes slurm.conf and gres.conf; sets CONFIG_CHANGED=1 when slurm.conf differs from what was there.
write_config() {
  local cpus sockets cores threads realmem ctld_addr=127.0.0.1 node_lines="" two_node_partition="" i
  read -r cpus sockets cores threads realmem < <(slurmd -C | awk '
    {for(i=1;i<=NF;i++){split($i,a,"="); v[a[1]]=a[2]}}
    /^NodeName/ {print v["CPUs"], v["SocketsPerBoard"]*v["Boards"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"]}')
  # every node describes this machine; more memory than slurmd sees would make a node INVAL ("Low RealMemory")
  local hardware="CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$((realmem * 95 / 100))"
  local nodes=$HOST
  if [ "$TWO_NODE" = 1 ]; then
    # slurmctld listens on every address; the nodes reach it on the bridge. This host's node uses the bridge address
    # too, so that every node can reach every other one when Slurm forwards messages through nodes.
    ctld_addr=$NET.1
    nodes="$HOST,$(IFS=,; echo "${NODES[*]}")"
    two_node_partition="PartitionName=$TWO_NODE_PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=NO MaxTime=INFINITE State=UP"
  fi
  if [ "$NGPU" -gt 0 ]; then
    mkdir -p "$STATE/fake-gpu"
    for i in $(seq 0 $((NGPU - 1))); do
      # Slurm 22.05 drops GPUs without a File=; a character device with /dev/null's numbers is never opened.
      [ -c "$STATE/fake-gpu/gpu$i" ] || { rm -f "$STATE/fake-gpu/gpu$i"; mknod -m 0666 "$STATE/fake-gpu/gpu$i" c 1 3; }
    done
    hardware+=" Gres=gpu:$NGPU"
    echo "NodeName=$nodes Name=gpu Count=$NGPU File=$STATE/fake-gpu/gpu[0-$((NGPU - 1))]" > /etc/slurm/gres.conf
  else
    rm -f /etc/slurm/gres.conf
  fi
  if [ "$TWO_NODE" = 1 ]; then
    for i in 1 2; do
      node_lines+="NodeName=${NODES[i - 1]} NodeHostname=${NODES[i - 1]} NodeAddr=$(node_ip "$i") $hardware State=UNKNOWN"$'\n'
    done
  fi
  local new
  new=$(cat <<CONF
# written by clusterlab tests/slurm/local_cluster.sh
ClusterName=clusterlab
SlurmctldHost=$HOST($ctld_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also bounds how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/state
# %n: the node name, so that the slurmd of each node keeps its own spool, pid file and log
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# cgroup plugins would move jobs out of the caller's own memory cgroup
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# a requeued job is otherwise scheduled again only up to 60 s later
SchedulerParameters=sched_interval=2,bf_interval=2
# jobs without --mem would otherwise take a whole node, one at a time
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
KillWait=10
MinJobAge=300
InactiveLimit=0
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# sacct -c reads finished jobs from here without slurmdbd
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
GresTypes=gpu
NodeName=$HOST NodeAddr=$ctld_addr $hardware State=UNKNOWN
${node_lines}PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
$two_node_partition
CONF
)
  CONFIG_CHANGED=0
  if [ "$new" != "$(cat /etc/slurm/slurm.conf 2>/dev/null)" ]; then
    printf '%s\n' "$new" > /etc/slurm/slurm.conf
    CONFIG_CHANGED=1
  fi
}

# ---- start / stop ------------------------------------------------------------------------------------------------
stop_slurm_daemons() {
  # slurmd.pid: the host node's pid file before the per-node names (%n) existed
  stop_pids "$STATE"/run/slurmd-*.pid "$STATE/run/slurmd.pid"
  stop_pids "$STATE/run/slurmctld.pid"
}

# Wait until every node of partition $1 is usable, resuming nodes an earlier run left down, drained or invalid, and
# bring the partition up if an interrupted test left it down (one takes the default partition down while it runs).
wait_partition() {
  local node state
  [ "$(sinfo -h -p "$1" -o %a 2>/dev/null | head -1)" = down ] && scontrol update PartitionName="$1" State=UP
  for _ in $(seq 60); do
    partition_ready "$1" && { say "ready: $(sinfo -h -p "$1" -o '%P %a %D %t %N' | head -1)"; return 0; }
    while read -r node state; do
      case "$state" in down|down\*|drain*|inval*) scontrol update nodename="$node" state=resume 2>/dev/null || true;; esac
    done < <(sinfo -h -N -p "$1" -o '%N %t' 2>/dev/null)
    sleep 0.5
  done
  echo "partition $1 did not become ready; see $STATE/log/" >&2
  return 1
}

start() {
  if command -v scontrol >/dev/null && ! ours && cluster_up; then
    say "a Slurm cluster this script did not configure already answers; using it (nothing started)"
    return 0
  fi
  [ "$(id -u)" = 0 ] || { echo "not root: cannot install or start Slurm daemons" >&2; exit 3; }
  install_packages
  getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
  mkdir -p "$STATE"/{state,spool,log,run}
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  make_network
  [ "$TWO_NODE" = 1 ] || say "no two-node partition: $TWO_NODE_REASON"
  write_config
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
    cp /run/munge/munged.pid "$STATE/run/munged.pid"
  fi
  # A fresh start clears the saved state (-c): what it holds is left by a run whose daemons died without `stop` (a
  # killed session). Its jobs would come back: one recorded as running held the node's CPUs for 32 minutes until
  # slurmctld gave up on it, while every job of the next test run waited; pending ones would rerun among the tests'.
  # A restart for a changed slurm.conf keeps the state, so that jobs still running survive it.
  # (pid files outlive killed daemons: only a slurmctld that is running has a queue worth keeping)
  local clear=-c
  if alive "$STATE/run/slurmctld.pid"; then clear=""; fi
  if [ "$CONFIG_CHANGED" = 1 ] && { alive "$STATE/run/slurmctld.pid" || compgen -G "$STATE/run/slurmd*.pid" >/dev/null; }; then
    say "slurm.conf changed: restarting the Slurm daemons"
    stop_slurm_daemons
  fi
  alive "$STATE/run/slurmctld.pid" || { say "starting slurmctld${clear:+ with an empty queue}"; /usr/sbin/slurmctld -i $clear; }
  for _ in $(seq 40); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
  mkdir -p "$STATE/spool/$HOST"
  alive "$STATE/run/slurmd-$HOST.pid" || { say "starting slurmd ($HOST)"; /usr/sbin/slurmd; }
  wait_partition "$PARTITION" || exit 1
  [ "$TWO_NODE" = 1 ] || return 0
  for i in 1 2; do
    alive "$STATE/run/slurmd-${NODES[i - 1]}.pid" || { say "starting slurmd (${NODES[i - 1]})"; start_node_slurmd "$i"; }
  done
  wait_partition "$TWO_NODE_PARTITION" || exit 1
  if ! nodes_connected; then
    # down with the reason (sinfo -R), so that `status` fails and the two-node tests say so instead of hanging
    local reason="${NODES[0]} cannot reach ${NODES[1]} over $BRIDGE (a firewall on bridged traffic?)"
    scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=down reason="$reason"
    echo "$reason" >&2
    exit 1
  fi
}

stop() {
  stop_slurm_daemons
  stop_pids "$STATE/run/munged.pid"
  remove_network
  say "stopped what this script had started"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) command -v scontrol >/dev/null && cluster_up "${2:-$PARTITION}" ;;
  *) echo "usage: $0 start|stop|status [PARTITION]" >&2; exit 2 ;;
esac
