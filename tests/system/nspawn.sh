# Booting a throw-away Debian container with systemd as PID 1 under
# systemd-nspawn on a host whose PID 1 is not systemd, and running commands
# in it. Sourced by tests/system/run and tests/system/libvirt. The recipe
# and the reason for every flag:
# /work/shared/reference/systemd-nspawn-testing.md (§3–§6).
#
# ct_boot ROOTFS NAME LOG   sets CT_NAME, CT_NSPAWN (pid), CT_LEADER (pid 1 inside)
# ct CMD…                   runs CMD inside (nsenter, clean env), bounded
# ct_shutdown               poweroff, then signals, then kill; always safe to call
# ct_until SECS CMD…        polls CMD inside until it succeeds, at most SECS
# pass TEXT / fail TEXT     counts a check / ends the test with the count
# ct_done                   the final count of a test that passed
# ct_package                sets deb: $CVS_DEB, or a package built here
#
# CT_TEST (set before sourcing) names the test in its count lines, which CI
# reads: "NAME: N passed, N failed".

CT_NAME=
CT_NSPAWN=
CT_LEADER=
CT_CG_UNIFIED=
CT_CG_SYSTEMD=
CT_TIMEOUT=${CT_TIMEOUT:-120}
# Several containers: ct_boot records each one; ct_use NAME makes it current.
declare -A CTS_NSPAWN=() CTS_LEADER=() CTS_CGU=() CTS_CGS=()

ct_use() {
  CT_NAME=$1
  CT_NSPAWN=${CTS_NSPAWN[$1]}
  CT_LEADER=${CTS_LEADER[$1]}
  CT_CG_UNIFIED=${CTS_CGU[$1]}
  CT_CG_SYSTEMD=${CTS_CGS[$1]}
}

# Runs CMD… in container NAME without changing the current one.
in_ct() {
  local n=$1
  shift
  ( ct_use "$n"; ct "$@" )
}

ct_shutdown_all() {
  local n
  for n in "${!CTS_NSPAWN[@]}"; do
    ct_use "$n"
    ct_shutdown
  done
}

ct_log() { printf '%s system-test: %s\n' "$(date +%T)" "$*" >&2; }

CT_TEST=${CT_TEST:-system-test}
checks=0
pass() { checks=$((checks + 1)); ct_log "ok $checks - $*"; }
fail() { ct_log "FAILED: $*"; echo "$CT_TEST: $checks passed, 1 failed"; exit 1; }
ct_done() { echo "$CT_TEST: $checks passed, 0 failed"; }

# Polls CMD… (in the current container) until it succeeds, at most $1 seconds.
ct_until() {
  local bound=$1 t0=$SECONDS
  shift
  until ct "$@" >/dev/null 2>&1; do
    (( SECONDS - t0 < bound )) || return 1
    sleep 0.2
  done
}

# Sets deb to the package under test: $CVS_DEB, else one built from this
# checkout. (Not for $(…): fail must end the test, not a subshell.)
ct_package() {
  deb=${CVS_DEB:-}
  if [[ -z $deb ]]; then
    ct_log "building the package"
    deb=$(tests/system/build-deb)
  fi
  [[ -f $deb ]] || fail "no package at $deb"
}

ct_boot() {
  local rootfs=$1 name=$2 log=$3
  CT_NAME=$name
  CT_LEADER=
  # §3 step 1: a cgroup of its own in both hierarchies, so nspawn's payload/
  # and supervisor/ land there and can be removed afterwards.
  if [[ -d /sys/fs/cgroup/unified && -d /sys/fs/cgroup/systemd ]]; then
    # Hybrid host (the reference setup): both hierarchies.
    CT_CG_UNIFIED=/sys/fs/cgroup/unified/$name
    CT_CG_SYSTEMD=/sys/fs/cgroup/systemd/$name
  else
    # Pure cgroup2 host: one hierarchy; the second write goes to the same file.
    CT_CG_UNIFIED=/sys/fs/cgroup/$name
    CT_CG_SYSTEMD=/sys/fs/cgroup/$name
  fi
  mkdir -p "$CT_CG_UNIFIED" "$CT_CG_SYSTEMD"
  # §3 step 2 and §5: detached (setsid), stdin from /dev/null, console to a
  # log, every inherited fd above 2 closed, then exec nspawn in the cgroup.
  # setsid does not fork here (a background job is no group leader), so $!
  # is nspawn's pid after the execs.
  setsid bash -c '
    echo $$ > "$1/cgroup.procs"
    echo $$ > "$2/cgroup.procs"
    for fd in /proc/$$/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
    done 2>/dev/null
    shift 2
    exec env SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 "$@"
  ' launcher "$CT_CG_UNIFIED" "$CT_CG_SYSTEMD" \
    systemd-nspawn --boot --console=read-only \
    --register=no --keep-unit \
    --system-call-filter=bpf \
    --private-network \
    --volatile=overlay \
    -D "$rootfs" -M "$name" \
    </dev/null >"$log" 2>&1 &
  CT_NSPAWN=$!
  CTS_NSPAWN[$name]=$CT_NSPAWN
  CTS_CGU[$name]=$CT_CG_UNIFIED
  CTS_CGS[$name]=$CT_CG_SYSTEMD
  CTS_LEADER[$name]=

  # §3 step 3: pid 1 inside is the child of nspawn whose comm is systemd.
  # comm, not cmdline: cmdline reads empty during exec (§5).
  local t0=$SECONDS p
  while [[ -z $CT_LEADER ]]; do
    if ! kill -0 "$CT_NSPAWN" 2>/dev/null; then
      ct_log "nspawn exited during boot; console log:"; cat "$log" >&2; return 1
    fi
    for p in $(ps -o pid= --ppid "$CT_NSPAWN" 2>/dev/null); do
      if [[ $(cat /proc/"$p"/comm 2>/dev/null) == systemd ]]; then CT_LEADER=$p; fi
    done
    if (( SECONDS - t0 > 60 )); then ct_log "no container PID 1 after 60 s"; cat "$log" >&2; return 1; fi
    [[ -n $CT_LEADER ]] || sleep 0.1
  done
  CTS_LEADER[$name]=$CT_LEADER
  # §3 step 4: systemctl inside fails at once before this exists.
  t0=$SECONDS
  until [[ -S /proc/$CT_LEADER/root/run/systemd/private ]]; do
    if (( SECONDS - t0 > 60 )); then ct_log "systemd inside never came up"; cat "$log" >&2; return 1; fi
    sleep 0.1
  done
  # §3 step 5: running, or degraded (then show what failed).
  local state
  state=$(timeout 90 nsenter -t "$CT_LEADER" -a systemctl is-system-running --wait 2>&1 || true)
  if [[ $state != running ]]; then
    ct_log "boot ended '$state'"
    ct systemctl --failed --no-pager >&2 || true
    return 1
  fi
}

# Runs a command inside with a clean environment; exit code passes through.
# Bounded: nothing inside may hang the test run.
ct() {
  timeout "$CT_TIMEOUT" nsenter -t "$CT_LEADER" -a -r -w \
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 HOME=/root TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

# Streams files into the container (never cp to /proc/PID/root: absolute
# symlinks there resolve on the host, §5).
ct_put() {
  local src_dir=$1 file=$2 dst_dir=$3
  tar -C "$src_dir" -cf - "$file" | ct tar -C "$dst_dir" -xf -
}

ct_shutdown() {
  [[ -n $CT_NSPAWN ]] || return 0
  local t0=$SECONDS next=0
  if [[ -n $CT_LEADER && -S /proc/$CT_LEADER/root/run/systemd/private ]]; then
    CT_TIMEOUT=10 ct systemctl poweroff --no-block >/dev/null 2>&1 || next=$SECONDS
  else
    next=$SECONDS
  fi
  # §5: a signal to a PID 1 that is still starting is dropped; resend.
  while kill -0 "$CT_NSPAWN" 2>/dev/null && (( SECONDS - t0 < 30 )); do
    if (( next > 0 && SECONDS >= next )) && [[ -n $CT_LEADER ]]; then
      kill -s SIGRTMIN+4 "$CT_LEADER" 2>/dev/null || true
      next=$((SECONDS + 5))
    fi
    sleep 0.2
  done
  if kill -0 "$CT_NSPAWN" 2>/dev/null; then
    ct_log "container did not power off within 30 s; terminating nspawn"
    kill -TERM "$CT_NSPAWN" 2>/dev/null || true
    sleep 3
    kill -KILL "$CT_NSPAWN" 2>/dev/null || true
  fi
  wait "$CT_NSPAWN" 2>/dev/null || true
  # Whatever is left in the container's own cgroups: by pid, nothing else.
  local cg pid d
  for cg in "$CT_CG_UNIFIED" "$CT_CG_SYSTEMD"; do
    [[ -n $cg && -d $cg ]] || continue
    for pid in $(cat $(find "$cg" -name cgroup.procs) 2>/dev/null); do
      kill -KILL "$pid" 2>/dev/null || true
    done
    # Depth first: nspawn's payload/ and supervisor/ and whatever systemd
    # made below them.
    find "$cg" -depth -type d 2>/dev/null | while read -r d; do rmdir "$d" 2>/dev/null || true; done
  done
  # Harmless leftover on hosts where /run is not a tmpfs (§4).
  rm -rf "/run/systemd/nspawn/propagate/$CT_NAME"
  CT_NSPAWN=
  unset "CTS_NSPAWN[$CT_NAME]"
}
