"""Paper Figure 4: behaviour shares with and without steering, 95% intervals (evaluation.parquet).

Usage: python analysis/figure4_steering.py RUN_DIR [--out DIR]  → steering.png, .svg
"""

from _figure import main

if __name__ == "__main__":
    main("steering", __doc__)
