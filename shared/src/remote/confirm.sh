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
say() { echo "@@nio $*"; }
# The activation unit ended without a result (a pid not yet written is not a dead unit).
died() { p=$(cat "$job/pid" 2> /dev/null); [ -n "$p" ] && ! kill -0 "$p" 2> /dev/null && [ ! -f "$job/result" ]; }
[ -d "$job" ] || { say failed nojob; exit 3; }
while [ ! -f "$job/result" ] && [ ! -f "$job/awaiting" ]; do
  if [ "$(cat /proc/sys/kernel/random/boot_id)" != "$(cat "$job/boot_id" 2> /dev/null)" ]; then
    say failed rebooted; exit 3
  fi
  if died; then
    say failed died; exit 3
  fi
  sleep 0.2
done
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
    if healthy "$@"; then
      health=ok
      [ -f "$job/result" ] || touch "$job/confirmed"
    else
      health="failed $?"
      [ -f "$job/result" ] || { echo "health check failed: $(tr '\n' ' ' < "$job/health.log" | head -c 400)" > "$job/abort"; }
    fi
    while [ ! -f "$job/result" ]; do sleep 0.2; done ;;
esac
result=$(cat "$job/result")
case $result in
  confirmed|done)
    case $health in
      failed*) ;;
      *) if [ -n "$marker" ]; then
           mkdir -p "${marker%/*}" && printf '%s %s\n' "$identity" "$(cat "$job/toplevel")" > "$marker.tmp" && mv -f "$marker.tmp" "$marker"
         fi ;;
    esac ;;
esac
# Disk: keep the two most recently used source trees and the last ten jobs (each job's `system` link is the
# GC root of what it built; the system profile's generations root what switch and boot installed).
state=${job%/jobs/*}
prune() { ls -1t "$1" 2> /dev/null | tail -n +"$(($2 + 1))" | while IFS= read -r d; do rm -rf "${1:?}/$d"; done; }
prune "$state/src" 2
prune "$state/jobs" 10
if [ -f "$job/health.log" ]; then tail -n 20 "$job/health.log"; fi
say health "$health"
say result "$result"
say system "$(readlink -e "$current")"
exit 0
