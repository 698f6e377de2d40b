# NIO: what a job reads first, in one round trip (docs/remote-protocol.md). Runs as the SSH user.
# $1 current system link  $2 booted system link  $3 applied marker  $4 source upload marker  $5 the job's directory
# Prints each part's output followed by a line "@@nio-status N" with its exit status.
part() { s=$?; echo; echo "@@nio-status $s"; }
nixos-version --json; part
readlink -e "$1"; part
readlink -e "$2"; part
cat /proc/sys/kernel/random/boot_id; part
cat "$3" 2>/dev/null; part
cat "$4" 2>/dev/null; part
id -u; part
if [ "$(id -u)" = 0 ]; then echo root; else sudo -n true 2>&1 && echo sudo; fi; part
if [ -d "$5" ]; then
  for f in toplevel boot_id activated awaiting result; do [ -f "$5/$f" ] && echo "$f=$(head -c 2000 "$5/$f")"; done
  true
else false; fi; part
