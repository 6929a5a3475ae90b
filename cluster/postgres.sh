#!/usr/bin/env bash
# A PostgreSQL server on 127.0.0.1 for Optuna studies and MLflow shared by many workers; the
# tests use it too. Debian's packages; run as root. Two databases, because Optuna and MLflow each
# keep their schema version in a table of the same name: `lab` for studies, `mlflow` for runs
# (`lab server` uses it by default).
#   cluster/postgres.sh start   -> prints the studies' URL (postgresql+psycopg2://lab:lab@127.0.0.1:5432/lab)
#   cluster/postgres.sh stop
set -euo pipefail
DB=${LAB_PG_DB:-lab}
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
[ -d "/etc/postgresql/$VERSION/main" ] || pg_createcluster "$VERSION" main >/dev/null
case "${1:-}" in
start)
    pg_ctlcluster "$VERSION" main start >/dev/null 2>&1 || pg_ctlcluster "$VERSION" main status >/dev/null
    su postgres -c "psql -qc \"DO \\\$\\\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='lab')
        THEN CREATE ROLE lab LOGIN PASSWORD 'lab'; END IF; END\\\$\\\$;\"" >/dev/null
    for db in "$DB" mlflow; do
        su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='$db'\"" | grep -q 1 \
            || su postgres -c "createdb -O lab $db"
    done
    echo "postgresql+psycopg2://lab:lab@127.0.0.1:5432/$DB"
    ;;
stop)
    pg_ctlcluster "$VERSION" main stop 2>/dev/null || true
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
