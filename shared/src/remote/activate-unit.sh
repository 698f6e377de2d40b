# NIO: the activation unit (docs/remote-protocol.md), run detached by systemd-run so that losing SSH does not
# stop it; the dead-man's switch. $1 job directory  $2 system  $3 action  $4 system profile
# $5 current system link  $6 roll back on failure: 1 or 0  $7 confirmation window (s)
# $8 the most each switch-to-configuration may take (s): one that hangs is stopped, so it cannot hold the
# machine's activation lock (and every later job) for good  $9 the secrets directory (a link to the live set)
set -u
job=$1 top=$2 action=$3 profile=$4 current=$5 rollback=$6 confirm=$7 limit=$8 secrets=$9
# Waiters block on two locks instead of polling: unit.lock is held until this unit exits (finished or dead),
# settle.lock until it settled (result, or awaiting its confirmation). Both are taken before the pid is written,
# so a waiter that sees the pid and gets a lock knows the unit settled or died. Commands run without these
# descriptors, so nothing they leave running can hold a lock.
exec 7> "$job/unit.lock" 6> "$job/settle.lock"
flock 7
flock 6
# Written whole (temp + rename): a reader never sees an empty pid.
echo $$ > "$job/pid.tmp" && mv -f "$job/pid.tmp" "$job/pid"
# One activation at a time on this machine, whatever the executors believe about their locks.
exec 9> "${job%/jobs/*}/activation.lock"
flock 9
log() { "$@" >> "$job/log" 2>&1 5>&- 6>&- 7>&- 9>&-; }
finish() { printf '%s\n' "$*" > "$job/result.tmp" && mv -f "$job/result.tmp" "$job/result"; exit 0; }
gen() { sed -n 's/.*-\([0-9][0-9]*\)-link$/\1/p'; }
previous=; if cd -P -- "$current" 2> /dev/null; then previous=$PWD; cd /; fi
echo "$previous" > "$job/previous"
# switch and boot: the system profile gets a new generation of this system (as nixos-rebuild's `nix-env -p
# <profile> --set`), under the lock, so that the order of activations is the order of boot defaults; the
# generation before is recorded for the rollback.
case $action in switch|boot)
  readlink "$profile" > "$job/profile-before" 2> /dev/null
  log nix-env -p "$profile" --set "$top" || finish "failed could not set the system profile (nix-env --set)"
  readlink "$profile" > "$job/profile-after" ;;
esac
# Secrets: the secrets directory is a link to one set under secrets.d (relative, swapped atomically); this job's
# set (none if it delivers none) goes live now, just before the activation, so files dropped from the
# configuration go, and a rollback puts the set that was live back. A directory left by an older NIO (or an
# install) becomes the set `legacy`. A dry run changes nothing.
sets=$secrets.d name=${job##*/} was=
live_set() { # the set to make live ("": none)
  if [ -z "$1" ]; then rm -f "$secrets"; return; fi
  ln -sfn "${sets##*/}/$1" "$secrets.new" && mv -T "$secrets.new" "$secrets"
}
case $action in switch|boot|test)
  if [ ! -L "$secrets" ] && [ -d "$secrets" ]; then
    install -d -m 0711 "$sets" && { [ ! -e "$sets/legacy" ] || rm -rf "$sets/legacy"; } \
      && mv -T "$secrets" "$sets/legacy" && live_set legacy
  fi
  if [ -L "$secrets" ]; then was=$(readlink "$secrets"); was=${was##*/}; fi
  if [ -d "$sets/$name" ]; then live_set "$name"; else live_set ""; fi
  # Sets no longer needed: not live, not the one a rollback returns to, and of no job still on the machine.
  for d in "$sets"/*; do
    n=${d##*/}
    [ -d "$d" ] && [ "$n" != "$name" ] && [ "$n" != "$was" ] && [ ! -d "${job%/*}/$n" ] && rm -rf "$d"
  done ;;
esac
# switch-to-configuration, stopped after $limit seconds (TERM, then KILL 30 s later): status 124 or 137
limited() { timeout -k 30 "$limit" "$@"; }
log limited "$top/bin/switch-to-configuration" "$action"
rc=$?
echo "$rc" > "$job/activated"
undo() {
  echo "nio: rolling back: $1" >> "$job/log"
  ok=1
  case $action in switch|boot)
    before=$(gen < "$job/profile-before") after=$(gen < "$job/profile-after")
    if [ -n "$before" ]; then
      log nix-env -p "$profile" --switch-generation "$before" || ok=0
      if [ -n "$after" ] && [ "$after" != "$before" ]; then
        log nix-env -p "$profile" --delete-generations "$after" || ok=0
      fi
    fi ;;
  esac
  case $action in switch|boot|test) live_set "$was" || ok=0 ;; esac
  default=$(readlink -e "$profile")
  case $action in
    switch) if [ -n "$previous" ]; then log limited "$previous/bin/switch-to-configuration" test || ok=0; fi
            log limited "$default/bin/switch-to-configuration" boot || ok=0 ;;
    boot) log limited "$default/bin/switch-to-configuration" boot || ok=0 ;;
    test) log limited "$default/bin/switch-to-configuration" test || ok=0 ;;
  esac
  if [ "$ok" = 1 ]; then finish "rolled-back $1"; else finish "rollback-failed $1"; fi
}
if [ "$rc" != 0 ]; then
  case $rc in
    124|137) why="switch-to-configuration $action did not finish within ${limit}s and was stopped" ;;
    *) why="switch-to-configuration $action exited with status $rc" ;;
  esac
  if [ "$rollback" = 1 ] && [ "$action" != dry-activate ]; then undo "$why"; fi
  finish "failed $why"
fi
case $action in boot|dry-activate) finish done ;; esac
if [ "$rollback" != 1 ]; then finish done; fi
# The dead-man's switch: the confirmation (confirm.sh) writes `confirmed` or `abort`, then a line into the FIFO
# `decide`, which ends this wait at once; without it the window runs out. (Without a FIFO: polling.)
decided() { [ -f "$job/confirmed" ] || [ -f "$job/abort" ]; }
now() { read -r t _ < /proc/uptime; t=${t%.*}; }
fifo=0
if { [ ! -e "$job/decide" ] || rm -f "$job/decide"; } && mkfifo -m 0600 "$job/decide"; then
  exec 5<> "$job/decide"
  fifo=1
fi
: > "$job/awaiting"
exec 6>&-
now; end=$((t + confirm))
# The window proves the machine can be reached after the activation. Once the confirmation is here and runs its
# health check (it writes `checking`: the check's own timeout), the wait is for the check, bounded by its
# timeout, not the window: a slow, healthy check is not a lost machine.
checking=0
while ! decided; do
  now
  if [ "$checking" = 0 ] && [ -f "$job/checking" ]; then
    checking=1 c=; read -r c < "$job/checking"
    case $c in ''|*[!0-9]*) ;; *) [ $((t + c + 30)) -gt "$end" ] && end=$((t + c + 30)) ;; esac
  fi
  [ "$t" -lt "$end" ] || break
  if [ "$fifo" = 1 ]; then timeout "$((end - t))" head -n 1 <&5 > /dev/null 2>&1; else sleep 0.2; fi
done
if [ -f "$job/confirmed" ]; then finish confirmed; fi
if [ -f "$job/abort" ]; then IFS= read -r why < "$job/abort"; undo "$why"; fi
undo "no confirmation over a new SSH connection within ${confirm}s"
