# Shared by the gateway bench scripts (source it): a temporary directory whose
# processes (PIDS) are stopped and which is removed on exit, waiting for a port,
# the one-upstream routes file, and the nginx.conf settings both proxies share.

TMP=$(mktemp -d)
PIDS=()
bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap bench_cleanup EXIT

# Waits (at most 10 s) until 127.0.0.1:PORT accepts connections.
wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 did not open" >&2; exit 1
}

# Writes $TMP/routes.toml: every path forwarded to 127.0.0.1:PORT.
one_upstream_routes() {
  cat > "$TMP/routes.toml" <<TOML
[[routes]]
name = "bench"
match = { path = { prefix = "/" } }
[routes.forward]
upstreams = ["127.0.0.1:$1"]
TOML
}

# Writes $TMP/nginx.conf: the shared settings (keep-alive to the upstreams,
# access log off, workers = cores), then the http-block lines given on stdin
# (upstreams and the server), then the closing brace.
nginx_conf() {
  mkdir -p "$TMP/nginx"
  {
    cat <<NGINX
worker_processes auto;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  keepalive_requests 1000000;
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_buffers 16 16k;
  proxy_buffer_size 16k;
NGINX
    cat
    echo "}"
  } > "$TMP/nginx.conf"
}

# Clock ticks per second, for the two helpers below.
HZ=$(getconf CLK_TCK)

# "USER SYS": utime and stime ticks summed over a list of pids.
cpu_ticks() {
  local u=0 s=0 a b
  for p in $1; do read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + a)); s=$((s + b)); done
  echo "$u $s"
}

# utime + stime ticks summed over a list of pids.
cpu_total() { local u s; read -r u s < <(cpu_ticks "$1"); echo $((u + s)); }
