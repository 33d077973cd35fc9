"""Cosine similarity between the behaviour vectors, per layer (vectors.safetensors).

Usage: python analysis/vector_similarity.py RUN_DIR [--out DIR]  → similarity.png, .svg
"""

from _figure import main

if __name__ == "__main__":
    main("similarity", __doc__)
