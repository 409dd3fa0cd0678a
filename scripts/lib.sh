# Shared by the service scripts: source it, then `start_service NAME PORT LOG COMMAND...`.

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts COMMAND in its own session with its output in LOG, and waits (10 s at most) until
# 127.0.0.1:PORT answers; otherwise prints the log's end and exits 1.
start_service() {
  local name=$1 port=$2 log=$3
  shift 3
  echo "$name: starting on 127.0.0.1:$port (log: $log)"
  setsid "$@" >"$log" 2>&1 </dev/null &
  for _ in $(seq 1 100); do
    listening "$port" && { echo "$name: ready on 127.0.0.1:$port"; return 0; }
    sleep 0.1
  done
  echo "$name: did not start; see $log" >&2
  tail -20 "$log" >&2
  exit 1
}
