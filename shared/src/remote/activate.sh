# NIO: upload, build, activate (docs/remote-protocol.md). Runs as root (sudo -n for another SSH user).
# $1 job directory  $2 source directory  $3 stdin: "tar" or "none"  $4 installable  $5 action
# $6 system profile  $7 current system link  $8 roll back on failure: 1 or 0  $9 confirmation window (s)
# $10 unit name  $11 secrets directory  $12 the activation wrapper (activate-unit.sh)
# $13 the most each switch-to-configuration may take (s)
# Prints "@@nio <key> <value>" records; any other line is log.
set -u
job=$1 src=$2 input=$3 installable=$4 action=$5 profile=$6 current=$7 rollback=$8 confirm=$9
unit=${10} secrets=${11} wrapper=${12} limit=${13}
settled() { [ -f "$job/result" ] || [ -f "$job/awaiting" ]; }
# What a link finally points to (a directory), into $r: `readlink -e` without a process.
resolve() { r=; if cd -P -- "$1" 2> /dev/null; then r=$PWD; cd /; fi; [ -n "$r" ]; }
# This job's secrets (the whole set its configuration delivers) wait here, beside the live ones, until its
# activation unit puts them in place (activate-unit.sh).
staged=$secrets.d/${job##*/}
# A failure is also written down: a confirmation over a new connection reads it when this one was lost. An
# upload that failed halfway, and the secrets of a job that will not activate, leave nothing behind.
fail() {
  [ ! -d "$job/in" ] || rm -rf "$job/in"
  [ ! -d "$staged" ] || rm -rf "$staged"
  echo "$1" > "$job/failed" 2> /dev/null; tidy 2> /dev/null; say failed "$1"; exit 3
}
umask 022
[ -d "$job" ] || mkdir -p "$job" || fail upload
# Losing the connection must not stop this script halfway (say, after the build and before the activation with
# its dead-man's switch started): it goes on with nobody reading its output, and
# the confirmation over a new connection waits for it while it runs (runner: its pid and boot id).
trap '' HUP PIPE
# One run per job at a time (a redelivered job waits for the first run over the confirmation instead); the
# confirmation blocks on this lock while the run is going.
exec 4> "$job/run.lock"
flock -n 4 || { say failed busy; exit 3; }
[ ! -e "$job/failed" ] || rm -f "$job/failed"
get /proc/sys/kernel/random/boot_id && echo "$$ $v" > "$job/runner"
bid=$v
if [ "$input" = tar ]; then
  say step upload
  in=$job/in
  { [ ! -e "$in" ] || rm -rf "$in"; } && mkdir -m 0700 "$in" || fail upload
  tar -x --same-owner -p -f - -C "$in" || fail upload
  if [ -d "$in/src" ]; then
    { [ -d "${src%/*}" ] || mkdir -p "${src%/*}"; } && { [ ! -e "$src" ] || rm -rf "$src"; } \
      && mv "$in/src" "$src" || fail upload
  fi
  # Directories 0711: a service user reaches the file its configuration gives it (owner, group, mode), but nobody
  # but root lists what else is there.
  if [ -d "$in/secrets" ]; then
    install -d -m 0711 "$secrets.d" && { [ ! -e "$staged" ] || rm -rf "$staged"; } \
      && find "$in/secrets" -type d -exec chmod 0711 {} + && mv "$in/secrets" "$staged" || fail upload
  fi
  rm -rf "$in"
fi
# Mark the source tree as used (pruning keeps the most recently used ones).
if [ -d "$src" ]; then touch "$src"; fi
say step build
# The system profile is set by the activation unit, under the machine's activation lock (a run that outlived its
# executor's timeout must not set it after a later job did). The build is bounded like the activation: a run
# nobody waits for any more does not go on for good.
if ! timeout -k 30 "$limit" nix --extra-experimental-features 'nix-command flakes' build --no-update-lock-file \
    --out-link "$job/system" "$installable" > "$job/build.log" 2>&1; then
  tail -n 30 "$job/build.log"
  # Nix's own refusal to write or change the flake's lock file (not a package build's, say cargo's --locked)
  if grep -q -e "requires lock file changes" -e "cannot write modified lock file" "$job/build.log"; then
    fail lockfile
  fi
  fail build
fi
if ! resolve "$job/system" || [ ! -x "$r/bin/switch-to-configuration" ]; then
  echo "$(readlink "$job/system") has no bin/switch-to-configuration: not a NixOS system"
  fail build
fi
top=$r
echo "$top" > "$job/toplevel"
say toplevel "$top"
printf '%s' "$wrapper" > "$job/activate"
get /proc/sys/kernel/random/boot_id && echo "$v" > "$job/boot_id"
say step activate
# A run of another job that is still going (its executor gave up on it: a timeout, say) activates first, so that
# this job's, started later, is what runs and boots in the end: wait for it to end or settle (it holds its
# run.lock until then; its build is bounded by its own limit).
for d in "${job%/*}"/*; do
  rp= rb=; [ "$d" != "$job" ] && [ -r "$d/runner" ] && read -r rp rb < "$d/runner"
  # (only runs that started before this one: two runs never wait for each other)
  [ -n "$rp" ] && [ "$rb" = "$bid" ] && [ -d "/proc/$rp" ] && [ "$d/runner" -ot "$job/runner" ] \
    && { flock -s 8; } 8<> "$d/run.lock"
done
# (Without run.lock: the unit outlives this run, and the lock says whether this run is still going.)
# A transient unit inherits none of this environment, and on NixOS its default PATH is systemd's own bin/ only:
# the unit gets this PATH (flock, timeout, mv, nix-env, …) and, as nixos-rebuild passes them, LOCALE_ARCHIVE and
# NIXOS_INSTALL_BOOTLOADER when set.
systemd-run --unit="$unit" --collect --quiet --setenv=PATH="$PATH" -E LOCALE_ARCHIVE -E NIXOS_INSTALL_BOOTLOADER -- \
  /bin/sh "$job/activate" "$job" "$top" "$action" "$profile" "$current" "$rollback" "$confirm" "$limit" "$secrets" 4>&- \
  || fail unit
# Until the activation settled: finished (result) or waiting for its confirmation (awaiting). The unit holds
# settle.lock (before it writes its pid) until then, so this blocks in flock instead of polling; the loop is for
# the moment before the unit started and for a unit that died.
while ! settled; do
  if [ -f "$job/pid" ]; then { flock -s 8; } 8<> "$job/settle.lock"; fi
  settled && break
  if died; then
    tail -n 30 "$job/log" 2> /dev/null
    fail died
  fi
  sleep 0.1
done
tail -n 30 "$job/log" 2> /dev/null
get "$job/activated"; say activated "$v"
# A job that ends here (boot, dry-activate, an activation that failed) has no confirmation to tidy up after it.
if get "$job/result"; then say result "$v"; tidy; fi
exit 0
