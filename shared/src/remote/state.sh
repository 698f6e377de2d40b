# NIO: what a job reads first, in one round trip (docs/remote-protocol.md). Runs as the SSH user.
# $1 current system link  $2 booted system link  $3 applied marker  $4 source upload marker  $5 the job's directory
# $6 the system profile (what the boot loader boots next)
# Prints each part's output followed by a line "@@nio-status N" with its exit status. Files are read with the
# shell's own `read` (one-line files; no process per file: this runs on every machine of a rollout).
part() { s=$?; echo; echo "@@nio-status $s"; }
line() { l=; [ -r "$1" ] && { IFS= read -r l < "$1" || [ -n "$l" ]; } && printf '%s\n' "$l"; }
nixos-version --json; part
# `readlink -e` of a system link (a directory), by the shell itself.
resolve() { r=; cd -P -- "$1" 2> /dev/null && r=$PWD && cd / && echo "$r"; }
resolve "$1"; part
resolve "$2"; part
line /proc/sys/kernel/random/boot_id; part
bid=$l
line "$3"; part
line "$4"; part
uid=
while read -r k _ e _; do [ "$k" = Uid: ] && uid=$e && break; done < /proc/self/status
[ -n "$uid" ] || uid=$(id -u)
echo "$uid"; part
if [ "$uid" = 0 ]; then echo root; else sudo -n true 2>&1 && echo sudo; fi; part
if [ -d "$5" ]; then
  for f in toplevel boot_id activated awaiting result failed; do
    [ -f "$5/$f" ] && { line "$5/$f" > /dev/null; echo "$f=$l"; }
  done
  job=$5; running "$bid" && echo "running=$rp"
  true
else false; fi; part
resolve "$6"; part
