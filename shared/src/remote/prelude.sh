# NIO: helpers shared by state.sh, activate.sh and confirm.sh (prepended to each at build time; see remote.rs).
say() { echo "@@nio $*"; }
# A one-line file's content into $v, by the shell itself (no process).
get() { v=; [ -r "$1" ] && { IFS= read -r v < "$1" || [ -n "$v" ]; }; }
# The activation unit in $job ended without a result (a pid not yet written is not a dead unit).
died() { get "$job/pid"; [ -n "$v" ] && ! kill -0 "$v" 2> /dev/null && [ ! -f "$job/result" ]; }
# An earlier delivery's activate.sh of the job in $job still runs (uploading or building) in boot $1: its pid and
# boot id are in $rp and $rb after the call, whatever the answer.
running() { rp= rb=; [ -r "$job/runner" ] && read -r rp rb < "$job/runner"; [ -n "$rp" ] && [ "$rb" = "$1" ] && [ -d "/proc/$rp" ]; }
# Disk, at the end of every job whatever its action and outcome: keep the two most recently used source trees
# and the last ten jobs (each job's `system` link is the GC root of what it built; the system profile's
# generations root what switch and boot installed).
prune() {
  set -- "$1" "$2" "$1"/*
  [ $# -gt $(($2 + 2)) ] || return 0
  ls -1t "$1" 2> /dev/null | tail -n +"$(($2 + 1))" | while IFS= read -r d; do rm -rf "${1:?}/$d"; done
}
tidy() { prune "${job%/jobs/*}/src" 2; prune "${job%/jobs/*}/jobs" 10; }
