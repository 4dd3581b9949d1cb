#!/bin/sh
# Chassis-control hook for ipmi_sim: keeps the simulated power state in a file beside this script.
# ipmi_sim calls it as "get power" (answer "power: 0|1") or "set power 0|1" / "set reset 1".
# Every "set" is also appended to the file "log" so tests can see a cycle (power 0, then power 1).
dir=$(dirname "$0")
case "$1" in
  get) shift; for p in "$@"; do echo "$p: $(cat "$dir/power" 2>/dev/null || echo 0)"; done ;;
  set) shift
       while [ $# -gt 0 ]; do
         echo "$1 $2" >> "$dir/log"
         [ "$1" = power ] && echo "$2" > "$dir/power"
         shift 2
       done ;;
esac
