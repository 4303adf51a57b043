# Stand-in for nginxinc/nginx-unprivileged:<version>-alpine (see README.md).
ARG BASE
FROM ${BASE}
RUN groupadd --system --gid 101 nginx && useradd --system --uid 101 --gid 101 --no-create-home --shell /usr/sbin/nologin nginx \
    && apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx-light wget \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled /var/www/html \
    && mkdir -p /usr/share/nginx/html /etc/nginx/conf.d /var/cache/nginx \
    && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log \
    && chown -R 101:0 /etc/nginx /var/cache/nginx && chmod -R g+w /etc/nginx /var/cache/nginx
USER 101
EXPOSE 8080
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
