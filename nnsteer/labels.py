"""The behaviour labels of the annotation scheme (paper, Section 3)."""

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
