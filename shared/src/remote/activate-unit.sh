# NIO: the activation unit (docs/remote-protocol.md), run detached by systemd-run so that losing SSH does not
# stop it; the dead-man's switch. $1 job directory  $2 system  $3 action  $4 system profile
# $5 current system link  $6 roll back on failure: 1 or 0  $7 confirmation window (s)
set -u
job=$1 top=$2 action=$3 profile=$4 current=$5 rollback=$6 confirm=$7
# Written whole (temp + rename): a reader never sees an empty pid.
echo $$ > "$job/pid.tmp" && mv -f "$job/pid.tmp" "$job/pid"
# One activation at a time on this machine, whatever the executors believe about their locks.
exec 9> "${job%/jobs/*}/activation.lock"
flock 9
log() { "$@" >> "$job/log" 2>&1; }
finish() { printf '%s\n' "$*" > "$job/result.tmp" && mv -f "$job/result.tmp" "$job/result"; exit 0; }
gen() { sed -n 's/.*-\([0-9][0-9]*\)-link$/\1/p'; }
previous=$(readlink -e "$current")
echo "$previous" > "$job/previous"
log "$top/bin/switch-to-configuration" "$action"
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
  default=$(readlink -e "$profile")
  case $action in
    switch) if [ -n "$previous" ]; then log "$previous/bin/switch-to-configuration" test || ok=0; fi
            log "$default/bin/switch-to-configuration" boot || ok=0 ;;
    boot) log "$default/bin/switch-to-configuration" boot || ok=0 ;;
    test) log "$default/bin/switch-to-configuration" test || ok=0 ;;
  esac
  if [ "$ok" = 1 ]; then finish "rolled-back $1"; else finish "rollback-failed $1"; fi
}
if [ "$rc" != 0 ]; then
  why="switch-to-configuration $action exited with status $rc"
  if [ "$rollback" = 1 ] && [ "$action" != dry-activate ]; then undo "$why"; fi
  finish "failed $why"
fi
case $action in boot|dry-activate) finish done ;; esac
if [ "$rollback" != 1 ]; then finish done; fi
touch "$job/awaiting"
i=0
while [ "$i" -lt $((confirm * 5)) ]; do
  if [ -f "$job/confirmed" ]; then finish confirmed; fi
  if [ -f "$job/abort" ]; then undo "$(cat "$job/abort")"; fi
  sleep 0.2
  i=$((i + 1))
done
undo "no confirmation over a new SSH connection within ${confirm}s"
