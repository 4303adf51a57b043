# Stand-in for postgres:<version>-alpine (see README.md).
ARG BASE
FROM ${BASE}
RUN groupadd --system --gid 70 postgres && useradd --system --uid 70 --gid 70 --home-dir /var/lib/postgresql --shell /bin/sh postgres \
    && apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql && chmod 0700 /var/lib/postgresql/data \
    && chmod 3777 /var/run/postgresql
# UTF-8 like the official image (LANG=en_US.utf8): initdb then creates UTF8 databases, not SQL_ASCII
# (whose text psycopg returns as bytes).
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
COPY --chmod=0755 postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER 70
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
