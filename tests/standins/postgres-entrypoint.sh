#!/bin/sh
# The part of the official postgres entrypoint the generated stack relies on (see README.md):
# first start initialises PGDATA as the current (non-root) user with the password file and
# POSTGRES_INITDB_ARGS, and creates POSTGRES_DB through a temporary socket-only server.
set -eu
if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of options, as in the real image
    initdb --username="${POSTGRES_USER:-postgres}" --pwfile="$POSTGRES_PASSWORD_FILE" ${POSTGRES_INITDB_ARGS:-} -D "$PGDATA" >/dev/null
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    shift
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' $*" -w start >/dev/null
    if [ "${POSTGRES_DB:-postgres}" != postgres ]; then
        PGPASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")" createdb --username="${POSTGRES_USER:-postgres}" "$POSTGRES_DB"
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    set -- postgres "$@"
fi
if [ "$1" = postgres ]; then
    shift
    exec postgres -c listen_addresses='*' "$@"
fi
exec "$@"
