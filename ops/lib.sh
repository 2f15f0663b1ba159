# Shared by the ops scripts: make sure RabbitMQ and PostgreSQL run locally, installing them from
# Debian's packages on a machine that lacks them.

PG_URL_BASE=${PG_URL_BASE:-postgres://postgres@127.0.0.1:5432}
AMQP_URL_BASE=${AMQP_URL_BASE:-amqp://guest:guest@127.0.0.1:5672}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local port=$1 what=$2 i
  for i in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 0.5
  done
  echo "error: $what did not come up on port $port" >&2
  return 1
}

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: $* missing and not root; install it: sudo apt-get install -y $*" >&2
    return 1
  fi
  log "installing $* from Debian packages"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_rabbitmq() {
  if ! port_open 5672; then
    command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
    log "starting RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_for_port 5672 RabbitMQ
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    # Quorum queues need their feature flag on brokers upgraded from old versions.
    rabbitmqctl enable_feature_flag all >/dev/null 2>&1 || true
  fi
  ensure_rabbitmq_prometheus
}

# RabbitMQ's own metrics on :15692 (per-queue depth for the lane alerts and the dashboard).
# Enabling a plugin does not restart the broker.
RABBITMQ_PROMETHEUS_PORT=${RABBITMQ_PROMETHEUS_PORT:-15692}
ensure_rabbitmq_prometheus() {
  port_open "$RABBITMQ_PROMETHEUS_PORT" && return 0
  command -v rabbitmq-plugins >/dev/null || return 0
  log "enabling RabbitMQ's Prometheus plugin (port $RABBITMQ_PROMETHEUS_PORT)"
  rabbitmq-plugins enable --quiet rabbitmq_prometheus >/dev/null 2>&1 ||
    echo "warning: could not enable rabbitmq_prometheus; RabbitMQ's metrics are not scraped" >&2
}

ensure_postgres() {
  port_open 5432 && return 0
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
    # Local development trusts loopback connections, as the project's machines do.
    local hba
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n 1)
    sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  log "starting PostgreSQL"
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 \
    || pg_ctlcluster "$version" main start
  wait_for_port 5432 PostgreSQL
}

# Prosody, for the UnifiedPush-over-XMPP gateway's tests: each test starts a private instance
# of its own (own config, data and ports), so only the program is needed here. A system service
# the package may start on install is left as it is.
ensure_prosody() {
  command -v prosody >/dev/null || apt_install prosody
}

ensure_services() {
  ensure_rabbitmq
  ensure_postgres
  command -v psql >/dev/null || apt_install postgresql-client
}

psql_admin() { psql "$PG_URL_BASE/postgres" -v ON_ERROR_STOP=1 -qtA "$@"; }

create_database() { psql_admin -c "CREATE DATABASE \"$1\"" >/dev/null; }
drop_database() { psql_admin -c "DROP DATABASE IF EXISTS \"$1\" WITH (FORCE)" >/dev/null 2>&1 || true; }

create_vhost() {
  rabbitmqctl add_vhost "$1" >/dev/null &&
    rabbitmqctl set_permissions -p "$1" guest '.*' '.*' '.*' >/dev/null
}
delete_vhost() { rabbitmqctl delete_vhost "$1" >/dev/null 2>&1 || true; }
