#!/usr/bin/env bash
# A real Slurm cluster on this machine (Debian/Ubuntu packages, run as root, no systemd, no cgroups), to try
# the launcher and sbatch scripts, and for tests/test_slurm*.py. Everything it writes lives in DIR.
#
#   bash slurm/local_cluster.sh start DIR [NODES]  # installs slurmctld slurmd slurm-client munge if missing (apt)
#   export SLURM_CONF=DIR/slurm.conf               # then sbatch / squeue / python -m slurm.launch --cluster slurm
#   bash slurm/local_cluster.sh stop DIR           # cancels the jobs, stops the daemons it started (by pid)
#
# NODES=1 (default): one node "localhost" (127.0.0.1) with all CPUs. NODES=N>1: one controller and N slurmd
# (Slurm's several-slurmd-per-host mode, `slurmd -N`), node i is named and addressed 127.0.0.(i+1), listens on
# its own port SLURMD_PORT+i-1 and has CPUS (default 1) CPUs: a job with --nodes=2 gets two nodes whose
# names (`scontrol show hostnames`, which fairseq's rendezvous uses) resolve without any /etc/hosts entry.
# Each slurmd runs in its own UTS namespace whose hostname is its address (what its tasks see as `hostname`);
# the network is this host's loopback. `stop` ends the daemons, and with them the namespaces.
#
# Environment: SLURM_CTLD_PORT (default 16817), SLURMD_PORT (16818), CPUS (nproc; 1 per node when NODES>1).
# Settings that matter (see ../shared/notes/slurm-recipe.md for how they were found):
#   AuthInfo=cred_expire=10 + sched_interval=5: a requeued job restarts after ~15 s instead of ~130 s;
#   CommunicationParameters=NoCtldInAddrAny,NoInAddrAny: daemons listen on the address of `hostname`,
#   which must be 127.0.0.1 (checked below), so nothing listens on other interfaces (NODES>1: see below);
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none: no cgroups needed.
set -euo pipefail
ACTION="${1:?start or stop}"
DIR="$(mkdir -p "${2:?state directory}" && cd "$2" && pwd)"
CTLD_PORT="${SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${SLURMD_PORT:-16818}"
NODES="${3:-1}"
[[ "$NODES" =~ ^[1-9]$ ]] || { echo "error: NODES must be 1 to 9, got '$NODES'" >&2; exit 2; }
export SLURM_CONF="$DIR/slurm.conf"

stop_pid() {  # stop one daemon we started, by its pid file, never by name
  local file="$1" pid
  [ -s "$file" ] || return 0
  pid="$(cat "$file")"
  kill "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
}

if [ "$ACTION" = stop ]; then
  if [ -f "$SLURM_CONF" ] && [ -s "$DIR/run/slurmctld.pid" ]; then
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true   # jobs of this cluster only (SLURM_CONF)
    for _ in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  stop_pid "$DIR/run/slurmd.pid"
  for file in "$DIR"/run/slurmd-*.pid; do stop_pid "$file"; done   # the nodes of NODES>1
  stop_pid "$DIR/run/slurmctld.pid"
  stop_pid "$DIR/run/munged.pid"   # only when this script started munged
  exit 0
fi
[ "$ACTION" = start ] || { echo "error: action must be start or stop, got '$ACTION'" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "error: a local Slurm cluster needs root (slurmd runs jobs as their users)" >&2; exit 3; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "error: slurm is not installed and apt-get is not available" >&2; exit 3; }
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } \
    > "$DIR/apt.log" 2>&1 || { echo "error: apt-get could not install slurm (see $DIR/apt.log)" >&2; exit 3; }
fi
if [ "$(getent ahostsv4 "$(hostname)" | awk 'NR==1{print $1}')" != "127.0.0.1" ]; then
  echo "error: $(hostname) does not resolve to 127.0.0.1; add '127.0.0.1 $(hostname)' to /etc/hosts" >&2; exit 3
fi

# munge: reuse a running munged (its socket answers), else start one (Debian's postinst made the key)
if ! munge -n >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || { mungekey -c -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key; }
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  cp /run/munge/munged.pid "$DIR/run.munged.pid" 2>/dev/null || true
fi
munge -n | unmunge >/dev/null
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
[ -f "$DIR/run.munged.pid" ] && mv "$DIR/run.munged.pid" "$DIR/run/munged.pid"

MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 8 / 10 ))
if [ "$NODES" = 1 ]; then
  CPUS="${CPUS:-$(nproc)}"
  NODE_CONF="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
  COMM=NoCtldInAddrAny,NoInAddrAny
  SLURMD_FILES="SlurmdSpoolDir=$DIR/spool
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdLogFile=$DIR/log/slurmd.log"
else  # several slurmd on this host: per-node files (%n = the node name), addresses and ports
  CPUS="${CPUS:-1}"
  NODE_CONF=""
  # Without NoInAddrAny: slurmd, slurmstepd and srun listen on all addresses (still only ever addressed on
  # 127.0.0.x). With it they listen on the address of `hostname` only, and that cannot work for several
  # nodes on one host: a node must listen on its NodeAddr (127.0.0.2), but an srun inside a job (the
  # submitit/sbatch job step) is called back at the source address of its connection, 127.0.0.1, while it
  # listens on 127.0.0.2 ("connect io: Connection refused"; tried). slurmctld stays on 127.0.0.1.
  COMM=NoCtldInAddrAny
  for ((i = 1; i <= NODES; i++)); do
    NODE_CONF+="NodeName=127.0.0.$((i + 1)) NodeHostname=127.0.0.$((i + 1)) NodeAddr=127.0.0.$((i + 1)) Port=$((SLURMD_PORT + i - 1)) CPUs=$CPUS RealMemory=$((MEM / NODES)) State=UNKNOWN
"
  done
  SLURMD_FILES="SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log"
fi
cat > "$SLURM_CONF" <<EOF
ClusterName=efficientlm
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
CommunicationParameters=$COMM
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
$SLURMD_FILES
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=10
MinJobAge=300
$NODE_CONF
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -i -f "$SLURM_CONF"
if [ "$NODES" = 1 ]; then
  slurmd -N localhost -f "$SLURM_CONF"
else
  # Each slurmd runs in its own UTS namespace (unshare --uts; the network is this host's) whose hostname is
  # its address: its jobs see `hostname` = 127.0.0.2 or 127.0.0.3, as on two machines (gloo binds each
  # rank to the address of its hostname). The namespace ends with its last process (nothing to remove).
  for ((i = 1; i <= NODES; i++)); do
    node="127.0.0.$((i + 1))"
    mkdir -p "$DIR/spool/$node"
    unshare --uts sh -c 'hostname "$1" && exec slurmd -N "$1" -f "$2"' slurmd "$node" "$SLURM_CONF"
  done
fi
idle() { [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)" = "$NODES" ]; }
for _ in $(seq 100); do idle && break; sleep 0.2; done
idle || { echo "error: not all $NODES node(s) came up; see $DIR/log"; sinfo -N >&2; exit 4; } >&2
echo "slurm is up: export SLURM_CONF=$SLURM_CONF"
