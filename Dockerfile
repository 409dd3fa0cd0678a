# The eventswarm daemon. Build: docker build -t eventswarm:latest .
# Without a registry, build on a local base: --build-arg BASE=eventswarm/base:local (scripts/base-image.sh).
# With a wheelhouse/ folder in the build context (scripts/daemon-image.sh makes one), the build
# installs from it and needs no network; otherwise it installs from PyPI.
# Run `make install` first: it builds the warm functions' runner (dispatcher/executors/bin/), which the
# image then carries (without it, a function with `warm` is refused at start with that advice).
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    EVENTSWARM_CONFIG=/etc/eventswarm/eventswarm.toml
WORKDIR /src
COPY . ./
RUN python3 -m venv /opt/eventswarm \
 && if [ -d wheelhouse ]; then /opt/eventswarm/bin/pip install --quiet --no-index --find-links wheelhouse eventswarm; \
    else /opt/eventswarm/bin/pip install --quiet .; fi \
 && rm -rf /src \
 && mkdir -p /var/lib/eventswarm /etc/eventswarm \
 && (getent passwd eventswarm >/dev/null || useradd --system --uid 10001 --home-dir /var/lib/eventswarm eventswarm 2>/dev/null \
     || echo "eventswarm:x:10001:10001::/var/lib/eventswarm:/usr/sbin/nologin" >> /etc/passwd) \
 && chown 10001:10001 /var/lib/eventswarm
ENV PATH=/opt/eventswarm/bin:$PATH
WORKDIR /var/lib/eventswarm
# Non-root by default; the Docker socket (root:docker) needs the socket's group or root: see deploy/README.md.
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EVENTSWARM_PORT', '8080') + '/healthz', timeout=2)"]
ENTRYPOINT ["eventswarm"]
CMD ["run"]
