# Standby's web app, proxy and worker (one image, three commands).
FROM python:3.11-slim
WORKDIR /app
# git (with ssh for ssh:// and user@host: URLs, and CA certificates for https://): the worker
# clones model code from git sources. Everything else is Python, from requirements.txt.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV STANDBY_DATA_DIR=/data STANDBY_BIND=0.0.0.0 PYTHONUNBUFFERED=1
VOLUME /data
