"""Cost of attribution per chain, relative to one plain forward pass over the chain.

Compares, on the same chains and spans:

- ``forward``: one plain forward pass over the whole chain (no gradient), the unit;
- ``nnsteer <metric>``: :func:`nnsteer.selection.attribution.probe_effects` (one clean forward with a
  KV cache, then one batched one-token forward and backward for all the chain's spans);
- ``authors``: the released code's approach, one forward and backward pass over the
  chain's prefix up to each span's end, per span (an nnsight trace, as theirs).

Usage: ``python bench/bench_attribution.py [--model smollm2-135m] [--chains 3] [--tokens 200]
[--spans 10] [--repeats 3] [--metrics nll,exact]``. Chains are synthetic text (timing does not depend on it).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from nnsteer.modeling.models import load_model
from nnsteer.selection.attribution import Probe, probe_effects

TEXT = ("Okay, so I need to figure out how many ways there are to arrange the books. "
        "Wait, maybe I should count the cases first. For example, with two books there are "
        "two orders. Hmm, I am not sure that generalises. Actually, the number of orders of "
        "n objects is n factorial, so the answer is twenty four. ")
LABELS = ("backtracking", "uncertainty-estimation", "example-testing", "adding-knowledge")
SPAN_TOKENS = 10


def make_chains(lm, n_chains: int, n_tokens: int, n_spans: int) -> tuple[dict, list[Probe]]:
    """Chains of ``n_tokens`` ids with ``n_spans`` evenly spaced spans of ``SPAN_TOKENS`` tokens."""
    ids = lm.tokenizer(TEXT * (n_tokens // 40 + 2), add_special_tokens=False)["input_ids"]
    sequences, probes = {}, []
    for c in range(n_chains):
        chain = ids[c: c + n_tokens]
        sequences[f"c{c}"] = chain
        step = (n_tokens - SPAN_TOKENS - 2) // n_spans
        for s in range(n_spans):
            position = 1 + s * step
            probes.append(Probe(f"c{c}", LABELS[s % len(LABELS)], LABELS[s % len(LABELS)],
                                position, chain[position + 1]))
    return sequences, probes


def authors_approach(lm, ids: list[int], probes: list[Probe], vectors: dict) -> torch.Tensor:
    """One forward and backward pass over the prefix up to each span's end, per span."""
    m, layers, n_layers = lm.nn, lm.layers, lm.arch.n_layers
    out = []
    for probe in probes:
        prefix = torch.tensor([ids[: probe.position + 1 + SPAN_TOKENS]])
        u = vectors[probe.label]
        with m.trace(input_ids=prefix, remote=lm.remote):
            m.model.embed_tokens.output.requires_grad_(True)
            hs = [layers[i].output for i in range(n_layers)]
            logp = torch.log_softmax(m.output.logits[0, probe.position].float(), -1)
            grads = torch.autograd.grad(-logp[probe.target], hs)
            effect = torch.stack([(g[0, probe.position].float() * u[i].to(g.device)).sum()
                                  for i, g in enumerate(grads)]).save()
        out.append(effect)
    return torch.stack(out)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Shortest wall time of ``fn()`` over ``repeats`` runs (robust to a shared, busy CPU),
    and its last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--chains", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--spans", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--metrics", default="nll,released-code,exact,kl2")
    args = parser.parse_args()

    torch.set_grad_enabled(True)
    lm = load_model(args.model, device=args.device)
    sequences, probes = make_chains(lm, args.chains, args.tokens, args.spans)
    gen = torch.Generator().manual_seed(0)
    vectors = {label: torch.randn(lm.arch.n_layers, lm.arch.d_model, generator=gen)
               for label in LABELS}
    print(f"model {args.model}: {lm.arch.n_layers} layers, width {lm.arch.d_model}, "
          f"{lm.dtype}, {lm.device}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"{args.chains} chains of {args.tokens} tokens, {args.spans} spans each; "
          f"fastest of {args.repeats} runs per chain, batch size {args.batch_size}\n")
    metrics = args.metrics.split(",")
    warm = [p for p in probes if p.chain_id == "c0"][:1]
    with torch.no_grad():
        lm.hf_model(torch.tensor([sequences["c0"]]))
    for metric in metrics:  # first calls compile nnsight's blocks: keep them out of the timing
        probe_effects(lm, sequences, warm, vectors, metric, args.batch_size, progress=False)
    authors_approach(lm, sequences["c0"], warm, vectors)

    rows: dict[str, list[float]] = {}
    ours, theirs = [], []
    for chain_id, ids in sequences.items():
        chain_probes = [p for p in probes if p.chain_id == chain_id]
        tensor = torch.tensor([ids])
        with torch.no_grad():
            seconds, _ = timed(lambda: lm.hf_model(tensor), args.repeats)
        rows.setdefault("forward (no grad)", []).append(seconds)
        for metric in metrics:
            seconds, effects = timed(lambda: probe_effects(
                lm, {chain_id: ids}, chain_probes, vectors, metric, args.batch_size,
                progress=False), args.repeats)
            rows.setdefault(f"nnsteer {metric}", []).append(seconds)
            if metric == "nll":
                ours.append(effects)
        seconds, effects = timed(lambda: authors_approach(lm, ids, chain_probes, vectors),
                                 args.repeats)
        rows.setdefault("authors nll (fwd+bwd per span prefix)", []).append(seconds)
        theirs.append(effects)

    forward = statistics.mean(rows["forward (no grad)"])
    print(f"{'approach':<40} {'s/chain':>9} {'× forward':>10}")
    for name, values in rows.items():
        mean = statistics.mean(values)
        print(f"{name:<40} {mean:>9.3f} {mean / forward:>10.2f}")
    if ours:
        authors = statistics.mean(rows["authors nll (fwd+bwd per span prefix)"])
        ours_t, theirs_t = torch.cat(ours), torch.cat(theirs)
        print(f"\nnnsteer nll is {authors / statistics.mean(rows['nnsteer nll']):.1f}× faster "
              f"than the authors' approach; max |difference| of the per-span effects "
              f"{(ours_t - theirs_t).abs().max().item():.2e} (max |effect| "
              f"{theirs_t.abs().max().item():.2e})")


if __name__ == "__main__":
    main()
