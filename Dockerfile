# Gateway image: the aggregator only (no torch, no device runtimes). Mosquitto runs beside it;
# docker-compose.yml runs both, and docs/DEPLOY.md walks through a deployment.
#   docker build -t edgefl-gateway .
#   docker run --rm -v $PWD/artifacts:/artifacts:ro -v edgefl-state:/state \
#       -p 127.0.0.1:8080:8080 edgefl-gateway \
#       --host mosquitto --artifacts /artifacts --federation prod --rounds 50 --status-host 0.0.0.0
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 10001 edgefl && mkdir /state && chown edgefl /state
WORKDIR /app
COPY . .
# Base dependencies only: numpy, safetensors, zstandard, paho-mqtt, scikit-learn, cryptography,
# prometheus-client, rich, tqdm. The device extras (torch, ExecuTorch, ONNX Runtime) stay out.
RUN pip install --no-compile .

USER edgefl
VOLUME ["/state"]
# Status page, /api/status, /metrics and /healthz (aggregator/status.py).
EXPOSE 8080
# /healthz answers 200 while the aggregator's MQTT link is up, 503 otherwise; urlopen raises on
# 503 and on a refused connection, so either makes python exit 1. The slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["edgefl", "aggregator", "--state-dir", "/state", "--status-port", "8080"]
