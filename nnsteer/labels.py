"""The behaviour labels of the annotation scheme (paper, Section 3), and the statuses of a span."""

LABELS: tuple[str, ...] = (
    "initializing",
    "deduction",
    "adding-knowledge",
    "example-testing",
    "uncertainty-estimation",
    "backtracking",
)

#: The four behaviours the paper steers and evaluates.
STEERED_LABELS: tuple[str, ...] = (
    "backtracking",
    "uncertainty-estimation",
    "example-testing",
    "adding-knowledge",
)

#: Name under which the all-reasoning mean vector is stored next to the labels.
OVERALL = "overall"

#: A span's ``status`` in ``annotations.parquet``: placed on the text with a known label, not
#: placed, placed with a label outside the scheme, or the chain's annotation failed.
OK, UNALIGNED, UNKNOWN_LABEL, FAILED = "ok", "unaligned", "unknown-label", "failed"
