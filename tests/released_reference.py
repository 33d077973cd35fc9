"""An independent port of what the authors' released code computes, in float64.

Written from reading ``cvenhoff/steering-thinking-llms`` (``train_vectors.py``
``update_mean_vectors``, ``utils.load_model_and_vectors``, ``analyze_layer_effects.py``),
not from nnsteer: plain loops, a Hugging Face model with forward hooks on its decoder
blocks, ``torch.autograd``. Its inputs are a run's stored token ids and character spans,
mapped to tokens here by decoding prefixes (the released code re-tokenises the decoded
text and looks each part up with ``str.find``; nnsteer deliberately does not, so the
port starts from the same token ids as nnsteer).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

STEERED = ("backtracking", "uncertainty-estimation", "example-testing", "adding-knowledge")


def char_spans_to_tokens(tokenizer, output_ids, spans, prompt_len):
    """``[(label, start, end)]`` in full-sequence token indices (end exclusive) of each
    ``(label, char_start, char_end)``: the tokens its characters overlap."""
    bounds = [len(tokenizer.decode(output_ids[:k])) for k in range(len(output_ids) + 1)]
    out = []
    for label, start, end in spans:
        tokens = [k for k in range(len(output_ids))
                  if bounds[k] < end and bounds[k + 1] > start and bounds[k + 1] > bounds[k]]
        if tokens:
            out.append((label, prompt_len + tokens[0], prompt_len + tokens[-1] + 1))
    return out


def block_outputs(model, ids):
    """``[n_layers, T, d]`` float64: the output of every decoder block for ``ids``."""
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            model.model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([s[0] for s in seen]).double()


def released_vectors(model, chains):
    """Per label ``[n_layers, d]``: each span one sample over ``[start-1, min(end-1, start+10))``,
    minus the mean over chains of each chain's window from its first to its last annotated
    token, rescaled per layer to that overall mean's norm.

    ``chains``: list of ``(ids, [(label, start, end)])`` in full-sequence token indices.
    """
    sums, counts = defaultdict(lambda: 0.0), defaultdict(int)
    for ids, spans in chains:
        if not spans:
            continue
        acts = block_outputs(model, ids)
        lo, hi = min(s for _, s, _ in spans), max(e for _, _, e in spans)
        sums["overall"] = sums["overall"] + acts[:, lo:hi].mean(1)
        counts["overall"] += 1
        for label, start, end in spans:
            sums[label] = sums[label] + acts[:, start - 1:min(end - 1, start + 10)].mean(1)
            counts[label] += 1
    overall = sums["overall"] / counts["overall"]
    vectors = {}
    for label in sums:
        if label == "overall":
            continue
        diff = sums[label] / counts[label] - overall
        vectors[label] = diff * (overall.norm(dim=-1, keepdim=True) / diff.norm(dim=-1, keepdim=True))
    return vectors


def probe_gradients(model, ids, start, end):
    """Per layer, the gradient of the released loss at position ``start - 1`` with respect
    to that block's output there: ``[n_layers, d]``.

    Only the probe's logits are computed, and no parameter gradient: the same numbers as
    the released full forward and backward, faster.
    """
    outputs = []

    def keep(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        outputs.append(hidden)

    model.requires_grad_(False)
    hooks = [layer.register_forward_hook(keep) for layer in model.model.layers]
    hooks.append(model.model.embed_tokens.register_forward_hook(
        lambda m, i, o: o.requires_grad_(True)))
    try:
        hidden = model.model(input_ids=torch.tensor([ids[:end]])).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    logits = model.lm_head(hidden[0, start - 1:start])
    logp = F.log_softmax(logits.mean(0), dim=-1)
    loss = F.kl_div(logp, F.log_softmax(logits.mean(0).detach(), dim=-1), reduction="batchmean")
    loss.backward()
    return torch.stack([h.grad[0, start - 1] for h in outputs])


def released_attribution(model, chains, vectors, n_examples=50, labels=STEERED):
    """Per label: the per-span effects ``{(chain index, start): [n_layers]}``, each chain's
    mean over its probes, and the mean and std (ddof 0) over chains, per layer.

    A label's vector (unit norm per layer) is probed before every span of *another* label
    of the first ``n_examples`` chains; effect = ``|û_l · ∂L/∂a_l|`` at the probe.
    """
    result = {}
    grads = {}
    for label in labels:
        if label not in vectors:
            continue
        unit = vectors[label] / vectors[label].norm(dim=-1, keepdim=True)
        per_span, per_chain = {}, []
        for c, (ids, spans) in enumerate(chains[:n_examples]):
            probes = [(s, e) for other, s, e in spans if other != label]
            if not probes:
                continue
            total = torch.zeros(unit.shape[0], dtype=torch.float64)
            for start, end in probes:
                if (c, start, end) not in grads:
                    grads[c, start, end] = probe_gradients(model, ids, start, end)
                effect = (unit * grads[c, start, end]).sum(-1).abs()
                per_span.setdefault((c, start), []).append(effect)
                total = total + effect
            per_chain.append(total / len(probes))
        stacked = torch.stack(per_chain)
        result[label] = {"spans": per_span, "chains": stacked, "mean": stacked.mean(0),
                         "std": stacked.std(0, correction=0)}
    return result
