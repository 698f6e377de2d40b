# NIO: helpers shared by activate.sh and confirm.sh (prepended to each at build time; see remote.rs).
say() { echo "@@nio $*"; }
# A one-line file's content into $v, by the shell itself (no process).
get() { v=; [ -r "$1" ] && { IFS= read -r v < "$1" || [ -n "$v" ]; }; }
# The activation unit in $job ended without a result (a pid not yet written is not a dead unit).
died() { get "$job/pid"; [ -n "$v" ] && ! kill -0 "$v" 2> /dev/null && [ ! -f "$job/result" ]; }
