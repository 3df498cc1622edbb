#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for the cluster tests (tests/test_slurm.py).
#
#   bash tests/slurm_cluster.sh install   # apt-get the Debian packages (slurm-wlm, munge); root
#   bash tests/slurm_cluster.sh up        # start munged, slurmctld and slurmd; prints `export SLURM_CONF=...`
#   bash tests/slurm_cluster.sh status    # sinfo + squeue
#   bash tests/slurm_cluster.sh env       # the line to eval before using sbatch/squeue by hand
#   bash tests/slurm_cluster.sh down      # cancel its jobs, then stop each daemon by its recorded PID
#
# Everything lives in one state folder (CHARACTER_EM_SLURM_DIR, default /tmp/character-em-slurm):
# slurm.conf, a private munge key and socket, spool folders, logs and one PID file per daemon.
# The ports are not SLURM's defaults and munge runs on a private socket, so a site's own munge
# is left alone. One thing lands outside the state folder: /etc/slurm/slurm.conf becomes a
# symlink to the state folder's slurm.conf. Inside a job the executor plugin strips SLURM_CONF
# from the environment of its `srun` step (snakemake-executor-plugin-slurm-jobstep 0.6), so
# that srun, like on a real cluster, only finds the default location. `up` refuses to replace a
# real /etc/slurm/slurm.conf (a machine that is part of a cluster), and `down` removes the link.
#
# The shape follows what works without systemd or cgroups (Debian 12, slurm-wlm 22.05):
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no accounting storage;
#   DefMemPerCPU set, because without it a job with no --mem takes the whole node;
#   MinJobAge well above 3x the executor plugin's status-check interval, because with
#   `slurm-status-command: squeue` a finished job must still be listed at the next check
#   (the plugin backs off to one check per 180 s, so 600 s).
# GPUs: none by default. CHARACTER_EM_SLURM_GPUS=N (at most 4) declares N *stand-in* GPUs
# (Gres=gpu:N backed by /dev/null, /dev/zero, ...: slurmd wants one distinct file each). SLURM
# then accepts and schedules `--gpus` requests exactly as on a GPU node, but no device exists and
# torch stays on the CPU. The tests use it to check what the workflow asks SLURM for.
#
# Settings (environment): CHARACTER_EM_SLURM_DIR, CHARACTER_EM_SLURM_CPUS (default: nproc),
# CHARACTER_EM_SLURM_MEM_MB (default: 75% of MemTotal), CHARACTER_EM_SLURM_GPUS (default 0),
# CHARACTER_EM_SLURM_PORT (slurmctld; slurmd uses the next port; default 16817),
# CHARACTER_EM_SLURM_MIN_JOB_AGE (default 600).
set -euo pipefail

STATE=${CHARACTER_EM_SLURM_DIR:-/tmp/character-em-slurm}
CONF="$STATE/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
PORT=${CHARACTER_EM_SLURM_PORT:-16817}
# Unique per port, so that `down` can tell this cluster's job processes from another's.
CLUSTER="characterem$PORT"
MIN_JOB_AGE=${CHARACTER_EM_SLURM_MIN_JOB_AGE:-600}
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)

log() { printf 'slurm_cluster: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "$1 needs root (the daemons run as SlurmUser=root, munged as user munge)"
}

# ----------------------------------------------------------------------------------- install

cmd_install() {
    if dpkg -s "${PACKAGES[@]}" >/dev/null 2>&1; then
        log "packages already installed: ${PACKAGES[*]}"
        return 0
    fi
    need_root install
    command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} with your package manager"
    apt-get update -qq
    # The packages' post-install scripts may try to start system services; in containers
    # policy-rc.d refuses that, which is fine: `up` starts its own daemons.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    log "installed: ${PACKAGES[*]}"
}

# ----------------------------------------------------------------------------------- helpers

pid_of() {  # the recorded PID of a daemon, if that process is still that daemon
    local name=$1 file="$STATE/$1.pid" pid
    [ -s "$file" ] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    # A PID can be reused after a crash; only a process with the daemon's name counts.
    [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
    echo "$pid"
}

running() { pid_of "$1" >/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2 i
    shift 2
    for ((i = 0; i < seconds * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "timed out after ${seconds}s waiting for $what (logs in $STATE/log)"
}

node_idle() {
    local state
    state=$(SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null | head -n1)
    [ "$state" = idle ] || [ "$state" = mixed ] || [ "$state" = allocated ]
}

write_conf() {
    local node cpus mem_mb gpus gres_types="" node_gres="" overrides=""
    node=$(hostname -s)
    gpus=${CHARACTER_EM_SLURM_GPUS:-0}
    rm -f "$STATE/gres.conf"
    if [ "$gpus" -gt 4 ]; then die "CHARACTER_EM_SLURM_GPUS=$gpus: at most 4 stand-in GPUs"; fi
    if [ "$gpus" -gt 0 ]; then
        gres_types="GresTypes=gpu"
        node_gres="Gres=gpu:$gpus"
        # slurmd reads gres.conf beside slurm.conf; one line per stand-in device.
        local devices=(/dev/null /dev/zero /dev/full /dev/urandom)
        for ((i = 0; i < gpus; i++)); do
            echo "NodeName=$node Name=gpu File=${devices[$i]}"
        done >"$STATE/gres.conf"
    fi
    cpus=${CHARACTER_EM_SLURM_CPUS:-$(nproc)}
    mem_mb=${CHARACTER_EM_SLURM_MEM_MB:-$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.75}' /proc/meminfo)}
    # More CPUs than the machine has: let slurmd accept the configured count instead of draining.
    if [ "$cpus" -gt "$(nproc)" ]; then overrides="SlurmdParameters=config_overrides"; fi
    cat >"$CONF" <<EOF
# Written by tests/slurm_cluster.sh; single-node test cluster, no systemd, no cgroups.
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
DefMemPerCPU=512
MinJobAge=$MIN_JOB_AGE
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
$overrides
$gres_types
NodeName=$node NodeAddr=127.0.0.1 $node_gres CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

link_etc_conf() {
    if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
        if [ "$(readlink "$ETC_CONF" || true)" = "$CONF" ]; then return 0; fi
        if [ -L "$ETC_CONF" ] && { [ ! -e "$ETC_CONF" ] || grep -qs '^# Written by tests/slurm_cluster.sh' "$ETC_CONF"; }; then
            rm -f "$ETC_CONF"  # ours, from another (or a deleted) state folder
        else
            die "$ETC_CONF exists and is not this fixture's: this machine has its own SLURM; not touching it"
        fi
    fi
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -s "$CONF" "$ETC_CONF"
}

unlink_etc_conf() {
    if [ "$(readlink "$ETC_CONF" 2>/dev/null || true)" = "$CONF" ]; then rm -f "$ETC_CONF"; fi
}

# ----------------------------------------------------------------------------------- up/down

cmd_up() {
    need_root up
    for binary in munged slurmctld slurmd sbatch squeue sinfo scancel srun; do
        command -v "$binary" >/dev/null || [ -x "/usr/sbin/$binary" ] ||
            die "$binary not found; run: bash tests/slurm_cluster.sh install"
    done
    if running slurmctld && running slurmd && running munged; then
        log "already up ($STATE)"
        link_etc_conf
        cmd_env
        return 0
    fi
    # Half-up from an earlier crash: stop what is left, then start clean.
    cmd_down >/dev/null 2>&1 || true
    # A failure below stops whatever did start, so that nothing is left running.
    trap 'if [ $? -ne 0 ]; then log "up failed; stopping what it started"; cmd_down; fi' EXIT

    # A fresh cluster every time (slurmctld -c below): no jobs or state from an earlier one.
    rm -rf "$STATE/spool"
    mkdir -p "$STATE/spool/slurmctld" "$STATE/spool/slurmd" "$STATE/log" "$MUNGE_DIR"
    chmod 0755 "$STATE"
    # munged refuses key, socket and log locations that others can write to.
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    write_conf
    link_etc_conf
    # Fresh logs for this cluster (the tests read slurmctld.log); keep the previous ones once.
    for f in "$STATE"/log/*.log; do
        if [ -e "$f" ]; then mv -f "$f" "$f.prev"; fi
    done

    runuser -u munge -- /usr/sbin/munged \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" ||
        die "munged did not start; see $MUNGE_DIR/munged.log"
    wait_for 10 munged munge -n -S "$MUNGE_SOCKET"
    cp "$MUNGE_DIR/munged.pid" "$STATE/munged.pid"

    # -c: a fresh cluster every time; jobs of an earlier test session are not recovered.
    SLURM_CONF=$CONF /usr/sbin/slurmctld -c -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    wait_for 20 slurmctld running slurmctld
    SLURM_CONF=$CONF /usr/sbin/slurmd -f "$CONF" || die "slurmd did not start; see $STATE/log/slurmd.log"
    wait_for 20 slurmd running slurmd
    wait_for 60 "the node to become idle" node_idle
    log "up: munged $(pid_of munged), slurmctld $(pid_of slurmctld), slurmd $(pid_of slurmd); state in $STATE"
    trap - EXIT
    cmd_env
}

stop_daemon() {
    local name=$1 pid i
    if ! pid=$(pid_of "$name"); then
        rm -f "$STATE/$name.pid"
        return 0
    fi
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
        [ -e "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -e "/proc/$pid" ]; then
        log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$name.pid"
    log "stopped $name ($pid)"
}

job_leftovers() {  # PIDs of processes that this cluster's jobs started and that outlived them
    local environ pid
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}
        pid=${pid%/environ}
        [ "$pid" != "$$" ] || continue
        # slurmstepd puts SLURM_CLUSTER_NAME in every job's environment; this name is ours alone.
        # (stderr first: kernel threads and zombies refuse the read, which is fine)
        if tr '\0' '\n' 2>/dev/null <"$environ" | grep -qx "SLURM_CLUSTER_NAME=$CLUSTER"; then echo "$pid"; fi
    done
}

stop_job_leftovers() {
    # proctrack/linuxproc follows a job's processes through their parent PIDs, so a process
    # whose parent exited first (reparented to init) escapes scancel. Stop those one by one.
    local pid pids
    pids=$(job_leftovers)
    [ -n "$pids" ] || return 0
    for pid in $pids; do
        log "stopping leftover job process $pid: $(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | cut -c1-120)"
        kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 2
    for pid in $pids; do
        if [ -e "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

cmd_down() {
    if running slurmctld; then
        # Jobs first, through SLURM itself, so that slurmd stops their processes before it exits.
        SLURM_CONF=$CONF scancel --user="$(id -un)" 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do
            [ -z "$(SLURM_CONF=$CONF squeue -h -t RUNNING,COMPLETING,PENDING -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_job_leftovers
    # Reverse start order: slurmd, slurmctld, then munged (both SLURM daemons need munge).
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    unlink_etc_conf
}

cmd_status() {
    running slurmctld || die "not running ($STATE)"
    SLURM_CONF=$CONF sinfo
    SLURM_CONF=$CONF squeue
}

cmd_env() {
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *)
        echo "usage: $0 install|up|down|status|env" >&2
        exit 2
        ;;
esac
