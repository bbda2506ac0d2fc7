# bench/lib.sh: shell helpers the bench scripts share. Source it after defining `log`.

# stop_pid PID [NAME]: SIGTERM, wait up to 10 s, then SIGKILL; reaped if it is our child.
stop_pid() {
    local pid=$1 name=${2:-forkd serve} i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) did not stop on SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# free_ports N: N distinct free TCP ports on 127.0.0.1, space-separated (free when asked: bind
# them soon after).
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
