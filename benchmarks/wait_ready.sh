# Sourced by vllm_side.sh and codellm_side.sh: wait_ready NAME PID PORT START LOG waits until the server (process PID,
# started at START, in seconds since the epoch) answers /health on 127.0.0.1:PORT, for at most $START_TIMEOUT seconds
# (360), says how long it took and fails with the log's last lines if it never did.
wait_ready() {
    local name=$1 pid=$2 port=$3 start=$4 log=$5 ready=0
    while [ $(( $(date +%s) - start )) -lt "${START_TIMEOUT:-360}" ]; do
        kill -0 "$pid" 2>/dev/null || { echo "$name exited"; break; }
        curl -sf "http://127.0.0.1:$port/health" > /dev/null && { ready=1; break; }
        sleep 1
    done
    echo "$name: $([ $ready = 1 ] && echo ready || echo NOT ready) after $(( $(date +%s) - start )) s"
    [ $ready = 1 ] || { tail -40 "$log"; return 1; }
}
