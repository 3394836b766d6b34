# inferq: one replica per container (`inferq serve`). Slim, non-root, no compiler in the image.
#   docker build -t inferq .
#   docker run -e INFERQ_DATABASE_URL=postgresql://... -p 8000:8000 inferq
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY sql ./sql
# The server extra: a bare `pip install inferq` is the worker only.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[server]'

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    INFERQ_HOST=0.0.0.0 \
    INFERQ_PORT=8000 \
    INFERQ_LOG_FORMAT=json \
    INFERQ_DATA_DIR=/var/lib/inferq
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'inferq[server]' && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /var/lib/inferq --create-home inferq \
    && install -d -o 10001 -g 10001 -m 0700 /tokens
USER 10001:10001
WORKDIR /var/lib/inferq
EXPOSE 8000
# /healthz answers while the process lives; /readyz (database + listener) is for the balancer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# SIGTERM drains (INFERQ_DRAIN_GRACE_S, 30 s) before exit; give the runtime a longer stop timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["inferq"]
CMD ["serve"]
