# NIO: upload, build, activate (docs/remote-protocol.md). Runs as root (sudo -n for another SSH user).
# $1 job directory  $2 source directory  $3 stdin: "tar" or "none"  $4 installable  $5 action
# $6 system profile  $7 current system link  $8 roll back on failure: 1 or 0  $9 confirmation window (s)
# $10 unit name  $11 secrets directory  $12 the activation wrapper (activate-unit.sh)
# Prints "@@nio <key> <value>" records; any other line is log.
set -u
job=$1 src=$2 input=$3 installable=$4 action=$5 profile=$6 current=$7 rollback=$8 confirm=$9
unit=${10} secrets=${11} wrapper=${12}
say() { echo "@@nio $*"; }
# The activation unit ended without a result (a pid not yet written is not a dead unit).
died() { p=$(cat "$job/pid" 2> /dev/null); [ -n "$p" ] && ! kill -0 "$p" 2> /dev/null && [ ! -f "$job/result" ]; }
fail() { say failed "$1"; exit 3; }
umask 022
mkdir -p "$job" || fail upload
if [ "$input" = tar ]; then
  say step upload
  in=$job/in
  rm -rf "$in" && mkdir -m 0700 "$in" || fail upload
  tar -x --same-owner -p -f - -C "$in" || fail upload
  if [ -d "$in/src" ]; then
    mkdir -p "${src%/*}" && rm -rf "$src" && mv "$in/src" "$src" || fail upload
  fi
  if [ -d "$in/secrets" ]; then
    install -d -m 0700 "$secrets" || fail upload
    (cd "$in/secrets" && find . ! -type d) | while IFS= read -r f; do
      mkdir -p "$(dirname "$secrets/$f")" && mv -f "$in/secrets/$f" "$secrets/$f" || exit 1
    done || fail upload
  fi
  rm -rf "$in"
fi
# Mark the source tree as used (pruning keeps the most recently used ones).
if [ -d "$src" ]; then touch "$src"; fi
say step build
if ! nix --extra-experimental-features 'nix-command flakes' build --no-update-lock-file \
    --out-link "$job/system" "$installable" > "$job/build.log" 2>&1; then
  tail -n 30 "$job/build.log"
  if grep -q "lock file" "$job/build.log"; then fail lockfile; fi
  fail build
fi
top=$(readlink -e "$job/system") || fail build
if [ ! -x "$top/bin/switch-to-configuration" ]; then
  echo "$top has no bin/switch-to-configuration: not a NixOS system"
  fail build
fi
echo "$top" > "$job/toplevel"
say toplevel "$top"
case $action in switch|boot)
  (readlink "$profile" || true) > "$job/profile-before" 2> /dev/null
  nix-env -p "$profile" --set "$top" > "$job/profile.log" 2>&1 || { cat "$job/profile.log"; fail profile; }
  readlink "$profile" > "$job/profile-after"
esac
printf '%s' "$wrapper" > "$job/activate"
cat /proc/sys/kernel/random/boot_id > "$job/boot_id"
say step activate
systemd-run --unit="$unit" --collect --quiet -- \
  /bin/sh "$job/activate" "$job" "$top" "$action" "$profile" "$current" "$rollback" "$confirm" || fail unit
# Until the activation settled: finished (result) or waiting for the confirmation (awaiting).
while [ ! -f "$job/result" ] && [ ! -f "$job/awaiting" ]; do
  if died; then
    tail -n 30 "$job/log" 2> /dev/null
    fail died
  fi
  sleep 0.2
done
tail -n 30 "$job/log" 2> /dev/null
say activated "$(cat "$job/activated" 2> /dev/null)"
if [ -f "$job/result" ]; then say result "$(cat "$job/result")"; fi
exit 0
