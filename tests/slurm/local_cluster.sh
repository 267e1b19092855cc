#!/usr/bin/env bash
# A one-node Slurm cluster on this machine for the tests, from Debian's packages (slurm-wlm 22.05 + munge).
#
#   tests/slurm/local_cluster.sh start   install what is missing, configure, start, wait until the node is idle
#   tests/slurm/local_cluster.sh stop    stop the daemons THIS script started (by its pid files), nothing else
#   tests/slurm/local_cluster.sh status  exit 0 when a cluster answers and its node is usable
#
# If a cluster already answers, `start` uses it and starts nothing (so `stop` stops nothing). The node advertises
# $CLUSTERLAB_FAKE_GPUS (default 2) fake GPUs backed by placeholder character devices, so GPU directives are
# accepted and scheduled; jobs find no CUDA and run on the CPU. Needs root and apt; otherwise it exits 3 with the
# reason, and the Slurm tests skip (or fail, with CLUSTERLAB_REQUIRE_SLURM=1).
# Facts behind the settings: shared/notes/slurm-local.md (requeue delay, memory, cgroups, gres pitfalls).
set -euo pipefail
STATE=${CLUSTERLAB_SLURM_DIR:-/var/tmp/clusterlab-slurm}
PARTITION=${CLUSTERLAB_SLURM_PARTITION:-debug}
NGPU=${CLUSTERLAB_FAKE_GPUS:-2}
HOST=$(hostname -s)
say() { echo "[local_cluster $(date +%T)] $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
cluster_up() { scontrol ping 2>/dev/null | grep -q UP && node_ready; }
node_ready() { case "$(sinfo -h -N -o %t 2>/dev/null | head -1)" in idle|mix|alloc|comp) return 0;; *) return 1;; esac; }

stop_pid() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$1"
}

install_packages() {
  local missing=() p
  for p in slurmctld slurmd slurm-client munge; do
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

write_config() {
  local cpus sockets cores threads realmem gres_line=""
  read -r cpus sockets cores threads realmem < <(slurmd -C | awk '
    {for(i=1;i<=NF;i++){split($i,a,"="); v[a[1]]=a[2]}}
    /^NodeName/ {print v["CPUs"], v["SocketsPerBoard"]*v["Boards"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"]}')
  if [ "$NGPU" -gt 0 ]; then
    mkdir -p "$STATE/fake-gpu"
    for i in $(seq 0 $((NGPU - 1))); do
      # Slurm 22.05 drops GPUs without a File=; a character device with /dev/null's numbers is never opened.
      [ -c "$STATE/fake-gpu/gpu$i" ] || { rm -f "$STATE/fake-gpu/gpu$i"; mknod -m 0666 "$STATE/fake-gpu/gpu$i" c 1 3; }
    done
    gres_line=" Gres=gpu:$NGPU"
    echo "NodeName=$HOST Name=gpu Count=$NGPU File=$STATE/fake-gpu/gpu[0-$((NGPU - 1))]" > /etc/slurm/gres.conf
  else
    rm -f /etc/slurm/gres.conf
  fi
  cat > /etc/slurm/slurm.conf <<CONF
# written by clusterlab tests/slurm/local_cluster.sh
ClusterName=clusterlab
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also bounds how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
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
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$((realmem * 95 / 100))$gres_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  if command -v scontrol >/dev/null && cluster_up; then
    say "a Slurm cluster already answers; using it (nothing started)"
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
  write_config
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
    cp /run/munge/munged.pid "$STATE/run/munged.pid"
  fi
  alive "$STATE/run/slurmctld.pid" || { say "starting slurmctld"; /usr/sbin/slurmctld -i; }
  for _ in $(seq 40); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
  alive "$STATE/run/slurmd.pid" || { say "starting slurmd"; /usr/sbin/slurmd; }
  for _ in $(seq 60); do
    node_ready && { say "ready: $(sinfo -h -o '%P %a %D %t %N' | head -1)"; return 0; }
    # a node left down/drained by an earlier run must be resumed; `idle*` (not responding yet) is waited for
    case "$(sinfo -h -N -o %t 2>/dev/null | head -1)" in down|down\*|drain*|inval*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true;; esac
    sleep 0.5
  done
  echo "the Slurm node did not become ready; see $STATE/log/" >&2
  exit 1
}

stop() {
  stop_pid "$STATE/run/slurmd.pid"
  stop_pid "$STATE/run/slurmctld.pid"
  stop_pid "$STATE/run/munged.pid"
  say "stopped what this script had started"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) command -v scontrol >/dev/null && cluster_up ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
