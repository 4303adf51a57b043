# Stand-in for redis:<version>-alpine (see README.md).
ARG BASE
FROM ${BASE}
RUN groupadd --system --gid 1000 redis && useradd --system --uid 999 --gid 1000 --no-create-home --shell /usr/sbin/nologin redis \
    && apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
