"""How far sentence wording can go: a learned sentence classifier, trained on one file of
LLM-annotated chains and scored on another, next to the offline ``rules`` annotator.

The classifier is a multinomial logistic regression (L2) on the rules label, the words, the
first two words, the position and the previous sentence's rules label, trained with each
sentence's word counts per LLM label as soft targets. It is never shipped; it only tells
whether better wording rules could reach a given macro-F1 on unseen chains. Also printed:
the rules' sentences each given their majority LLM label, the limit of the sentence split.

Usage: python analysis/rules_ceiling.py TRAIN.json TEST.json [--l2 0.001 0.003 0.01]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import torch

from nnsteer.annotation.agreement import agreement, read_annotated_chains, word_labels
from nnsteer.annotation.rules import rules_annotate
from nnsteer.annotation.spans import parse_annotation
from nnsteer.labels import LABELS

CLASSES = [*LABELS, "none"]


def sentence_rows(path: str) -> list[tuple[list[str], Counter]]:
    """(features, LLM word labels) of every sentence the rules annotator makes in ``path``."""
    rows = []
    for record in read_annotated_chains(path):
        text = record["thinking_process"]
        reference = word_labels(text, parse_annotation(record["annotated_response"], text))
        word_starts = [m.start() for m in re.finditer(r"\S+", text)]
        previous_end, previous_label = 0, "start"
        for index, span in enumerate(rules_annotate(text)):
            if "\n\n" in text[previous_end:span.start]:
                previous_label = "start"
            words = re.findall(r"[a-z']+", span.text.lower())
            features = [f"rule={span.label}", f"previous={previous_label}",
                        f"position={min(index, 4)}", f"begins={' '.join(words[:2])}",
                        f"question={span.text.endswith('?')}",
                        f"digit={any(c.isdigit() for c in span.text)}",
                        *(f"word={w}" for w in set(words))]
            labels = Counter(reference[i] for i, start in enumerate(word_starts)
                             if span.start <= start < span.end)
            rows.append((features, labels))
            previous_end, previous_label = span.end, span.label
    return rows


def design(rows, vocabulary: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot feature matrix and per-class word-count targets."""
    x = torch.zeros(len(rows), len(vocabulary))
    y = torch.zeros(len(rows), len(CLASSES))
    for i, (features, labels) in enumerate(rows):
        for feature in features:
            if feature in vocabulary:
                x[i, vocabulary[feature]] = 1.0
        for label, count in labels.items():
            y[i, CLASSES.index(label)] = count
    return x, y


def fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.nn.Linear:
    """Class-balanced soft-target logistic regression."""
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], len(CLASSES))
    balance = (y.sum() / (y.sum(0) + 1)).sqrt()
    optimiser = torch.optim.LBFGS(model.parameters(), max_iter=300)

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = -(y * balance * torch.log_softmax(model(x), -1)).sum() / y.sum()
        value = value + l2 * model.weight.pow(2).sum()
        value.backward()
        return value

    optimiser.step(loss)
    return model


def macro_f1(predicted: list[str], rows) -> float:
    """Word-level macro-F1 of one label per sentence against the LLM word labels."""
    reference, repeated = [], []
    for label, (_, labels) in zip(predicted, rows):
        for true, count in labels.items():
            reference += [true] * count
            repeated += [label] * count
    return agreement(reference, repeated).macro_f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train")
    parser.add_argument("test")
    parser.add_argument("--l2", type=float, nargs="+", default=[0.001, 0.003, 0.01])
    args = parser.parse_args()
    train, test = sentence_rows(args.train), sentence_rows(args.test)
    counts = Counter(f for features, _ in train for f in features)
    vocabulary = {f: i for i, f in enumerate(f for f, n in counts.items() if n >= 3)}
    x_train, y_train = design(train, vocabulary)
    x_test, _ = design(test, vocabulary)
    rules_labels = [next(f[5:] for f in features if f.startswith("rule=")) for features, _ in test]
    print(f"train {args.train}\ntest  {args.test}")
    majority = [labels.most_common(1)[0][0] if labels else "none" for _, labels in test]
    print(f"rules annotator on test: macro-F1 {macro_f1(rules_labels, test):.3f}")
    print(f"its sentences, each given its majority LLM label: macro-F1 {macro_f1(majority, test):.3f}")
    for l2 in args.l2:
        model = fit(x_train, y_train, l2)
        with torch.no_grad():
            scores = {name: model(x)[:, :len(LABELS)].argmax(-1).tolist()
                      for name, x in (("train", x_train), ("test", x_test))}
        print(f"classifier l2={l2:g}: macro-F1 on test {macro_f1([LABELS[i] for i in scores['test']], test):.3f}"
              f" (on its own training file {macro_f1([LABELS[i] for i in scores['train']], train):.3f})")


if __name__ == "__main__":
    main()
