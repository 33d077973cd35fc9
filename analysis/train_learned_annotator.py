"""Train the ``learned`` annotator's head on LLM-annotated chains, print its cross-file
agreement, and write the weights with their provenance.

Each file (annotated-chains JSON: ``thinking_process``, ``annotated_response``) is one
model's chains. Printed: for every ordered pair of the ``--r1`` files, the head trained on
one and scored on the other (word-level macro-F1 and per-label F1, as
``nnsteer annotate --agreement`` measures them, next to the ``rules`` annotator); then the
head trained on all ``--r1`` files scored on each ``--other`` file. The shipped head is
trained on all ``--r1`` files (and ``--other`` ones with ``--ship-all``).

Encoding the chains with SmolLM2 is the slow part (minutes for 400 chains on 2 cores):
``--cache FILE`` keeps the sentence encodings (keyed by each file's sha256) outside the
repository, so heads can be retrained from it in seconds.

Usage: python analysis/train_learned_annotator.py --r1 A.json B.json [--other C.json ...]
       [--out nnsteer/data/learned_annotator.safetensors] [--cache /tmp/nnsteer-learned-features.pt]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nnsteer.annotation.agreement import (
    Agreement,
    agreement,
    read_annotated_chains,
    word_labels,
)
from nnsteer.annotation.learned import (
    CLASSES,
    LAYER,
    WINDOW,
    Head,
    SentenceEncoder,
    sentence_features,
)
from nnsteer.annotation.rules import rules_annotate
from nnsteer.annotation.spans import parse_annotation
from nnsteer.labels import LABELS
from nnsteer.runs.store import atomic_path

#: Layer counts whose encodings the cache keeps (the head uses one of them).
CACHED_LAYERS = (4, 8)

Chain = dict[str, torch.Tensor]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chain_rows(record: dict, encoder: SentenceEncoder, layers: tuple[int, ...]) -> Chain:
    """Encodings (one per layer count), features, rules labels and LLM word counts per
    class of the rules' sentences of one annotated chain."""
    text = record["thinking_process"]
    reference = word_labels(text, parse_annotation(record["annotated_response"], text))
    spans = rules_annotate(text)
    word_starts = torch.tensor([m.start() for m in re.finditer(r"\S+", text)], dtype=torch.long)
    sentence = torch.bucketize(word_starts, torch.tensor([s.start for s in spans]), right=True) - 1
    counts = torch.zeros(len(spans), len(CLASSES))
    for i, label in zip(sentence.tolist(), reference):
        counts[i, CLASSES.index(label)] += 1
    encodings = encoder.encode(text, [(s.start, s.end) for s in spans], layers)
    chain = {f"layer{layer}": e for layer, e in zip(layers, encodings)}
    chain.update(features=sentence_features(text, spans), counts=counts,
                 rules=torch.tensor([LABELS.index(s.label) for s in spans]))
    return chain


def load_chains(paths: list[Path], cache: Path | None, layers: tuple[int, ...],
                limit: int | None = None) -> dict[Path, list[Chain]]:
    """The chains of each file (its first ``limit`` if given), encoded. A file ``cache``
    has is taken from it as cached (its first chains, ``limit`` of them at most); a new one
    is encoded and added."""
    stored = torch.load(cache) if cache and cache.exists() else {}
    encoder = None
    out = {}
    for path in paths:
        key = f"{sha256(path)}-window{WINDOW}-" + ",".join(map(str, layers))
        if key not in stored:
            encoder = encoder or SentenceEncoder(max(layers))
            stored[key] = [chain_rows(r, encoder, layers) for r in tqdm(
                read_annotated_chains(path)[:limit], desc=f"encode {path.name}", unit="chain")]
            if cache:
                with atomic_path(cache) as tmp:
                    torch.save(stored, tmp)
        out[path] = stored[key][:limit]
    return out


def batch(chains: list[Chain], layer: int) -> tuple[torch.Tensor, ...]:
    """Padded encodings, features, counts and a mask of real sentences."""
    pad = torch.nn.utils.rnn.pad_sequence
    mask = pad([torch.ones(len(c["counts"]), dtype=torch.bool) for c in chains], batch_first=True)
    return (pad([c[f"layer{layer}"] for c in chains], batch_first=True),
            pad([c["features"] for c in chains], batch_first=True),
            pad([c["counts"] for c in chains], batch_first=True), mask)


def train(chains: list[Chain], *, layer: int = LAYER, project: int = 64, hidden: int = 48,
          epochs: int = 60, lr: float = 3e-3, weight_decay: float = 1e-2, balance: float = 0.5,
          seed: int = 0) -> Head:
    """A head fit to the LLM word counts of ``chains`` (soft targets, classes weighted by
    inverse frequency to the power ``balance``)."""
    torch.manual_seed(seed)
    encodings = torch.cat([c[f"layer{layer}"] for c in chains])
    head = Head(encodings.shape[1], project, hidden)
    head.mean.copy_(encodings.mean(0))
    head.std.copy_(encodings.std(0) + 1e-3)
    counts = torch.cat([c["counts"] for c in chains]).sum(0)
    weight = (counts.sum() / (counts + 1)) ** balance
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(chains), generator=order).split(8):
            x, f, y, mask = batch([chains[i] for i in idx], layer)
            log_p = torch.log_softmax(head(x, f), -1)
            loss = -(y * weight * log_p)[mask].sum() / y[mask].sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    head.eval()
    return head


@torch.no_grad()
def predict(head: Head, chains: list[Chain], layer: int = LAYER) -> list[torch.Tensor]:
    """The label index of every sentence of each chain."""
    return [head(c[f"layer{layer}"][None], c["features"][None])[0, :, :len(LABELS)].argmax(-1)
            for c in chains]


def word_agreement(chains: list[Chain], labels: list[torch.Tensor]) -> Agreement:
    """Word-level agreement of one label per sentence with the chains' LLM word labels."""
    counts = torch.cat([c["counts"] for c in chains])  # (sentences, classes)
    predicted = torch.cat(labels)
    reference, repeated = [], []
    for cls, name in enumerate(CLASSES):
        for sentence in counts[:, cls].nonzero().flatten().tolist():
            n = int(counts[sentence, cls])
            reference += [name] * n
            repeated += [LABELS[predicted[sentence]]] * n
    return agreement(reference, repeated)


def figures(name: str, chains: list[Chain], head: Head, layer: int) -> tuple[dict, str]:
    """Agreement of ``head`` and of the rules on ``chains``: a JSON record and a table."""
    learned = word_agreement(chains, predict(head, chains, layer))
    rules = word_agreement(chains, [c["rules"] for c in chains])
    record = {"test": name, "macro_f1": round(learned.macro_f1, 3), "kappa": round(learned.kappa, 3),
              "f1": {k: round(v, 3) for k, v in learned.f1.items()},
              "rules_macro_f1": round(rules.macro_f1, 3),
              "rules_f1": {k: round(v, 3) for k, v in rules.f1.items()}}
    lines = [f"{'label':<24}{'learned F1':>11}{'rules F1':>10}{'words':>8}"]
    lines += [f"{x:<24}{learned.f1[x]:>11.3f}{rules.f1[x]:>10.3f}{learned.support[x]:>8}" for x in LABELS]
    lines.append(f"macro-F1 learned {learned.macro_f1:.3f} (kappa {learned.kappa:.3f}), "
                 f"rules {rules.macro_f1:.3f} (kappa {rules.kappa:.3f})")
    return record, "\n".join(lines)


def save(head: Head, out: Path, provenance: dict) -> None:
    """The head's weights (safetensors) and ``out.with_suffix('.json')`` provenance."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(state, str(tmp))
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(provenance, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r1", type=Path, nargs="+", required=True,
                        help="files of thinking-model chains: cross-file pairs, and the shipped head")
    parser.add_argument("--other", type=Path, nargs="*", default=[],
                        help="more files, scored by the head trained on all --r1 files")
    parser.add_argument("--ship-all", action="store_true", help="train the shipped head on --other files too")
    parser.add_argument("--out", type=Path, default=None, help="where to write the weights (.safetensors)")
    parser.add_argument("--cache", type=Path, default=None, help="cache of sentence encodings")
    parser.add_argument("--limit", type=int, default=None, help="use the first N chains of each file")
    parser.add_argument("--layer", type=int, default=LAYER, choices=CACHED_LAYERS)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args(argv)
    started = time.time()
    data = load_chains([*args.r1, *args.other], args.cache, CACHED_LAYERS, args.limit)
    config = {"layer": args.layer, "project": 64, "hidden": 48, "epochs": args.epochs}

    def fit(paths: list[Path]) -> Head:
        return train([c for p in paths for c in data[p]], layer=args.layer,
                     project=config["project"], hidden=config["hidden"], epochs=args.epochs)

    results = []
    pairs = [([a], b) for a in args.r1 for b in args.r1 if a != b]
    pairs += [(list(args.r1), b) for b in args.other]
    for train_paths, test in pairs:
        record, table = figures(test.name, data[test], fit(train_paths), args.layer)
        record["train"] = [p.name for p in train_paths]
        results.append(record)
        print(f"train {' + '.join(record['train'])} -> test {test.name}\n{table}\n")
    if args.out:
        shipped = [*args.r1, *(args.other if args.ship_all else [])]
        head = fit(shipped)
        save(head, args.out, {
            "annotator": "learned",
            "encoder": {"model": "smollm2-135m", "layers": args.layer, "window": WINDOW,
                        "pooling": "mean of final-norm'd hidden states of the sentence's tokens"},
            "head": config,
            "trained_on": [{"file": p.name, "sha256": sha256(p), "chains": len(data[p])}
                           for p in shipped],
            "date": datetime.date.today().isoformat(),
            "cross_file": results,
        })
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
