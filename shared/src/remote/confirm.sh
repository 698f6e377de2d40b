# NIO: confirmation over a new SSH connection (docs/remote-protocol.md). Runs as root (sudo -n for another SSH
# user). Waits for the activation to settle, runs the health check, confirms (or has the host roll back), and
# writes the applied marker after a confirmed switch. Safe to run again for the same job: it reports the result.
# $1 job directory  $2 applied marker ("" for none)  $3 target identity (the marker holds it and the built
# system)  $4 current system link
# $5 health check: 1 or 0  $6 health timeout (s)  $7 failed units to ignore (space separated)
# $8... health command (none: no failed units)
set -u
job=$1 marker=$2 identity=$3 current=$4 check=$5 timeout=$6 allow=$7
shift 7
# Ends the wait when the activation cannot settle any more. Before the activation started (no boot_id yet),
# the job's first connection may have been lost while it uploaded or built: wait while activate.sh (runner)
# still runs in this boot, and report how it ended otherwise.
ran() { get "$job/failed"; [ -z "$v" ] && return 0; tail -n 30 "$job/build.log" 2> /dev/null; say failed "$v"; exit 3; }
gone() {
  ran
  get /proc/sys/kernel/random/boot_id; b=$v
  if ! get "$job/boot_id"; then
    # still running: block until it ends (it holds run.lock), then look again
    if running "$b"; then { flock -s 4; } 4<> "$job/run.lock"; return 0; fi
    ran
    if [ -n "$rp" ] && [ "$rb" != "$b" ]; then say failed rebooted; exit 3; fi
    say failed interrupted; exit 3
  fi
  if [ "$b" != "$v" ]; then say failed rebooted; exit 3; fi
  if died; then say failed died; exit 3; fi
}
# Blocks while the unit holds the lock (activate-unit.sh: settle.lock until it settled, unit.lock until it
# exits); polls only before the unit started and for a unit that holds no lock.
until_unit() {
  until [ -f "$job/$1" ] || [ -f "$job/$2" ]; do
    if [ -f "$job/pid" ]; then { flock -s 8; } 8<> "$job/$3"; fi
    [ -f "$job/$1" ] || [ -f "$job/$2" ] && break
    gone
    sleep 0.1
  done
}
[ -d "$job" ] || { say failed nojob; exit 3; }
until_unit result awaiting settle.lock
healthy() {
  [ "$check" = 1 ] || return 0
  if [ $# -gt 0 ]; then timeout "$timeout" "$@" > "$job/health.log" 2>&1; return; fi
  timeout "$timeout" systemctl list-units --state=failed --no-legend --plain > "$job/units" 2>&1 \
    || { cp "$job/units" "$job/health.log"; return 1; }
  bad=""
  while read -r u _; do
    case " $allow " in *" $u "*) ;; *) bad="$bad $u" ;; esac
  done < "$job/units"
  [ -z "$bad" ] && return 0
  echo "failed units:$bad" > "$job/health.log"
  return 1
}
health=skipped
state=$(cat "$job/result" 2> /dev/null || echo awaiting)
case $state in
  awaiting|done)
    say step health
    # Tell a waiting unit the confirmation is here: it waits for the check rather than its window.
    if [ "$state" = awaiting ] && [ "$check" = 1 ]; then
      echo "$timeout" > "$job/checking"
      if [ -p "$job/decide" ]; then echo 1<> "$job/decide"; fi
    fi
    if healthy "$@"; then
      health=ok
      [ -f "$job/result" ] || : > "$job/confirmed"
    else
      health="failed $?"
      [ -f "$job/result" ] || { echo "health check failed: $(tr '\n' ' ' < "$job/health.log" | head -c 400)" > "$job/abort"; }
    fi
    # Wake the unit's wait (a FIFO it holds open; writing never blocks, and nothing is left if it is gone).
    if [ -p "$job/decide" ]; then echo 1<> "$job/decide"; fi
    until_unit result result unit.lock ;;
esac
get "$job/result"; result=$v
case $result in
  confirmed|done)
    case $health in
      failed*) ;;
      *) if [ -n "$marker" ]; then
           get "$job/toplevel"
           { [ -d "${marker%/*}" ] || mkdir -p "${marker%/*}"; } && printf '%s %s\n' "$identity" "$v" > "$marker.tmp" \
             && mv -f "$marker.tmp" "$marker"
         fi ;;
    esac ;;
esac
tidy
if [ -f "$job/health.log" ]; then tail -n 20 "$job/health.log"; fi
say health "$health"
say result "$result"
r=; if cd -P -- "$current" 2> /dev/null; then r=$PWD; cd /; fi
say system "$r"
exit 0
