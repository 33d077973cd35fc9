"""Paper Figure 3: mean |ΔL| of each label's vector per layer (attribution.parquet).

Usage: python analysis/figure3_attribution.py RUN_DIR [--out DIR]  → attribution.png, .svg
"""

from _figure import main

if __name__ == "__main__":
    main("attribution", __doc__)
