# meshproxy: one image for the gateway, the sidecar and the control plane.
#   docker build -t meshproxy:0.1.0 .
#   docker run -p 8008:8008 -p 8033:8033 meshproxy:0.1.0                      # gateway.yaml
#   docker run meshproxy:0.1.0 control-plane -c /etc/meshproxy/control-plane.yaml

# Build stage: a virtualenv with meshproxy and its dependencies (all from wheels).
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/meshproxy
COPY pyproject.toml README.md ./
COPY meshproxy ./meshproxy
RUN /opt/meshproxy/bin/pip install --no-cache-dir .

# Runtime stage: the virtualenv and the example configs, run as an unprivileged user.
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="meshproxy" \
      org.opencontainers.image.description="Model-aware L7 proxy for KServe v2 / Open Inference Protocol" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 meshproxy \
 && useradd --system --uid 10001 --gid meshproxy --no-create-home --shell /usr/sbin/nologin meshproxy \
 && mkdir -p /var/lib/meshproxy \
 && chown meshproxy:meshproxy /var/lib/meshproxy
COPY --from=build /opt/meshproxy /opt/meshproxy
COPY config/gateway.yaml config/sidecar.yaml config/control-plane.yaml /etc/meshproxy/
ENV PATH=/opt/meshproxy/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
# REST, gRPC, admin (the gateway config binds admin on 0.0.0.0 for probes and scraping).
EXPOSE 8008 8033 9901
# /ready answers 503 while draining; the image has no curl, Python is there anyway.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/ready', timeout=2)"]
ENTRYPOINT ["meshproxy"]
CMD ["proxy", "-c", "/etc/meshproxy/gateway.yaml"]
