#!/usr/bin/env bash
# run.sh BIN TARGET NAME [bench args...]: fresh server (jobcast on a new SQLite file, or nchan), one bench run.
set -euo pipefail
BIN=$1; TARGET=$2; NAME=$3; shift 3
OUT=/tmp/lat/out; mkdir -p $OUT
PORT=17810; NP=17811
ulimit -n "$(ulimit -Hn)"
if [ "$TARGET" = jobcast ]; then
  rm -rf /tmp/lat/db; mkdir -p /tmp/lat/db
  JOBCAST_LOG=warn "$BIN" serve --listen 127.0.0.1:$PORT --db sqlite:///tmp/lat/db/j.db --heartbeat 15s >/tmp/lat/j.log 2>&1 &
  SPID=$!; PIDS=$SPID; URL=http://127.0.0.1:$PORT
else
  rm -rf /tmp/lat/ng; mkdir -p /tmp/lat/ng
  cat >/tmp/lat/ng/nginx.conf <<CONF
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
daemon off; master_process on; worker_processes 2; pid /tmp/lat/ng/nginx.pid;
error_log /tmp/lat/ng/error.log warn;
events { worker_connections 10000; multi_accept on; }
http { access_log off; client_body_temp_path /tmp/lat/ng/body; proxy_temp_path /tmp/lat/ng/proxy;
  fastcgi_temp_path /tmp/lat/ng/fcgi; uwsgi_temp_path /tmp/lat/ng/uwsgi; scgi_temp_path /tmp/lat/ng/scgi;
  keepalive_requests 1000000; keepalive_timeout 300s; nchan_shared_memory_size 256m;
  server { listen 127.0.0.1:$NP;
    location ~ ^/sub/(\w+)\$ { nchan_subscriber eventsource; nchan_channel_id \$1; nchan_subscriber_timeout 0;
      nchan_eventsource_ping_interval 15; nchan_eventsource_ping_comment "hb"; }
    location ~ ^/pub/(\w+)\$ { nchan_publisher; nchan_channel_id \$1; nchan_message_buffer_length 1000; nchan_message_timeout 1h; } } }
CONF
  nginx -c /tmp/lat/ng/nginx.conf -p /tmp/lat/ng >/tmp/lat/ng/stderr.log 2>&1 &
  SPID=$!; URL=http://127.0.0.1:$NP
fi
for _ in $(seq 100); do curl -s -o /dev/null $URL/ && break; sleep 0.1; done
sleep 0.5
[ "$TARGET" = nchan ] && PIDS=$(ps -o pid= --ppid $SPID | tr -d ' ' | paste -sd, -)
[ "$TARGET" = jobcast ] && curl -s $URL/metrics > $OUT/$NAME.m0
echo "uptime: $(uptime)" | tee $OUT/$NAME.uptime
"$BIN" bench "$@" --target $TARGET --server $URL --pid "$PIDS" --json $OUT/$NAME.json 2>&1 | grep -E "latency|CPU|deliver|ack" || true
if [ "$TARGET" = jobcast ]; then curl -s $URL/metrics > $OUT/$NAME.m1; python3 /tmp/lat/stages.py $OUT/$NAME.m0 $OUT/$NAME.m1; fi
echo "uptime after: $(uptime)" | tee -a $OUT/$NAME.uptime
kill -TERM $SPID; wait $SPID 2>/dev/null || true
