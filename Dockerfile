# Gateway image: the aggregator only (no torch, no device runtimes). Mosquitto runs beside it.
#   docker build -t edgefl-gateway .
#   docker run --rm -v $PWD/artifacts:/artifacts:ro -v edgefl-state:/state edgefl-gateway \
#       --host mosquitto --artifacts /artifacts --federation prod --rounds 50
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 10001 edgefl && mkdir /state && chown edgefl /state
WORKDIR /app
COPY . .
# Base dependencies only: numpy, safetensors, zstandard, paho-mqtt, scikit-learn, rich, tqdm.
RUN pip install --no-compile .

USER edgefl
VOLUME ["/state"]
ENTRYPOINT ["edgefl", "aggregator", "--state-dir", "/state"]
