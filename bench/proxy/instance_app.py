"""The benchmark instance: a small Flask app answering 1 KB (`gunicorn bench.proxy.instance_app:app`)."""
from flask import Flask, Response

app = Flask(__name__)
PAYLOAD = b"x" * 1024


@app.get("/")
def one_kilobyte():
    return Response(PAYLOAD, mimetype="text/plain")


@app.get("/ping")
def ping():
    return "ok"
