#!/bin/sh
# The official postgres image's start-up contract, for PostgreSQL from Debian's packages: on the
# first start (no PG_VERSION in PGDATA) create the cluster with POSTGRES_USER (default postgres)
# as its superuser, whose password is POSTGRES_PASSWORD or the content of POSTGRES_PASSWORD_FILE,
# and the database POSTGRES_DB (default: the user's name); listen on every address with
# scram-sha-256 passwords. Then run the command (`postgres`), as PID 1.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
        POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")
    fi
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgresql: set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE (the superuser's password)" >&2
        exit 1
    fi
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --username="$user" --pwfile="$pwfile" --auth-local=scram-sha-256 \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 > /dev/null
    rm -f "$pwfile"
    printf "listen_addresses = '*'\n" >> "$PGDATA/postgresql.conf"
    printf 'host all all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        # Single-user mode: no server, no socket, no password needed for this one statement.
        printf 'CREATE DATABASE "%s" OWNER "%s";\n' "$db" "$user" \
            | postgres --single -D "$PGDATA" postgres > /dev/null
    fi
    echo "postgresql: created the cluster in $PGDATA (user $user, database $db)"
fi
exec "$@"
