# Standby's web app, proxy and worker (one image, three commands).
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV STANDBY_DATA_DIR=/data STANDBY_BIND=0.0.0.0 PYTHONUNBUFFERED=1
VOLUME /data
