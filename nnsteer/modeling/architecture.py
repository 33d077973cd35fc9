"""Where the parts nnsteer touches live in any transformers causal LM, found on the model.

:meth:`Architecture.discover` finds them on the model itself, for every decoder family
``AutoModelForCausalLM`` loads:

- the decoder blocks: the ``ModuleList`` of ``num_hidden_layers`` modules whose outputs
  are the residual stream (block *l*'s output is ``output_hidden_states[l + 1]``);
- the embedding and the unembedding: ``get_input_embeddings()``, ``get_output_embeddings()``;
- the final norm: the norm module beside the blocks whose output is the unembedding's input.

With real weights (offloaded ones too) a short forward pass checks all of it; a model that
fails the check is refused in one line naming its family and the reason, never used
silently wrong. On meta weights (NDIF, ``nnsteer models``) the structural answer stands alone.

:data:`QUIRKS` names where a family departs from the generic decoder, why nnsteer stays
exact there, and what it changes (only ``plain_kv_cache``: whether attribution may reuse
one clean forward's KV cache, see :mod:`nnsteer.selection.attribution`), and the padding
quirks: with real weights discovery also runs a left-padded batch against its row alone,
for a forward pass and for a few cached decode steps (:func:`padding_quirks`); a family
whose outputs the padding changes gets ``padded-forward`` or ``padded-decode``, and then
:meth:`Architecture.batches` puts only sequences of equal length in one batch, so that
no result depends on the batch size.

Example:
    >>> arch = Architecture.discover(hf_model)
    >>> arch.layers_path, arch.norm_path, arch.quirks
    ('model.layers', 'model.norm', ('logit-softcapping', 'scaled-embeddings', 'sliding-window'))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from nnsteer.errors import BadInput, first_line, say


def _cache_layer_kinds(config: Any) -> set[str]:
    """Class names of the cache layers transformers builds for ``config``."""
    from transformers import DynamicCache

    try:
        return {type(layer).__name__ for layer in DynamicCache(config=config).layers}
    except Exception:  # a config the cache cannot read: treat as not plain, stay exact
        return {"unknown"}


def _config_value(config: Any, *names: str) -> Any:
    """The first of ``names`` that ``config`` sets (not None), else None."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class Quirk:
    """A way a family departs from the generic decoder, and what nnsteer does about it."""

    reason: str
    applies: Callable[[Any], bool]  # of the text config
    breaks_kv_cache: bool = False


#: Named quirks, detected from the (text) config. Each is tested in tests/test_families.py.
QUIRKS: dict[str, Quirk] = {
    "scaled-embeddings": Quirk(
        "the embedding module multiplies by sqrt(width) (Gemma): the residual stream starts "
        "at its scaled output, and nnsteer reads and steers block outputs only",
        lambda c: c.model_type.startswith("gemma")),
    "logit-softcapping": Quirk(
        "final logits are tanh(z / cap) * cap (Gemma 2/3): attribution's losses take the "
        "logits the model returns, never unembed(norm(h))",
        lambda c: bool(getattr(c, "final_logit_softcapping", None))),
    "multipliers": Quirk(
        "embedding, residual and logit multipliers (Granite) are applied inside the model's "
        "forward: block outputs are the scaled residual stream, logits are the model's own",
        lambda c: any(getattr(c, name, 1.0) not in (None, 1.0) for name in
                      ("embedding_multiplier", "residual_multiplier", "logits_scaling"))),
    "attention-sinks": Quirk(
        "learned per-head sink logits in every softmax (gpt-oss): inside attention, no "
        "change to the residual stream",
        lambda c: c.model_type == "gpt_oss"),
    "mixture-of-experts": Quirk(
        "routed experts (router logits are recorded by hooks, not returned): a block's "
        "output stays the residual tensor; nnsteer never asks for router logits",
        lambda c: bool(_config_value(c, "num_experts", "num_local_experts", "n_routed_experts"))),
    "sliding-window": Quirk(
        "some layers attend to a window and their cache keeps only its last tokens: "
        "attribution runs each probe on its own prefix, without a cache",
        lambda c: "DynamicSlidingWindowLayer" in _cache_layer_kinds(c), breaks_kv_cache=True),
    "hybrid-cache": Quirk(
        "linear-attention or Mamba layers carry a recurrent state, not per-position keys and "
        "values: attribution runs each probe on its own prefix, without a cache",
        lambda c: bool(_cache_layer_kinds(c) - {"DynamicLayer", "DynamicSlidingWindowLayer"}),
        breaks_kv_cache=True),
    "padded-decode": Quirk(
        "left padding changes its cached decode steps (MiniMax's lightning attention carries "
        "the pads in its state): generation runs only prompts of equal token length together",
        lambda c: c.model_type in PADDED_DECODE_FAMILIES),
    "padded-forward": Quirk(
        "left padding changes a forward pass: extract, attribute, calibration and the NLL "
        "cost run only sequences of equal length together",
        lambda c: False),  # found on the weights only
}
#: Families whose cached decode steps left padding changes: where the check cannot run
#: (meta weights: NDIF, ``nnsteer models``), the ``padded-decode`` quirk comes from here.
PADDED_DECODE_FAMILIES = frozenset({"minimax"})
#: The quirks :func:`padding_quirks` decides on real weights.
PADDING_QUIRKS = ("padded-forward", "padded-decode")


#: The families tested in CI (tests/test_families.py) on a tiny random-weight model of each:
#: others load too when :meth:`Architecture.discover` verifies them.
SUPPORTED_FAMILIES: tuple[str, ...] = (
    "llama", "qwen2", "qwen3", "qwen3_moe", "gpt_oss", "olmo2", "olmo3", "phi3", "mistral",
    "mixtral", "gemma2", "gemma3_text", "smollm3", "exaone4", "granite", "deepseek_v3",
    "glm4_moe", "qwen3_next", "nemotron_h", "minimax",
)


def _refuse(family: str, reason: str, source: str = "") -> BadInput:
    where = f"{source}: " if source else ""
    return BadInput(f"{where}unsupported architecture {family!r}: {reason}")


def _module_path(model: torch.nn.Module, module: Any) -> str | None:
    """The dotted name of ``module`` inside ``model``, or None."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


@dataclass(frozen=True)
class Architecture:
    """Where the parts nnsteer touches live in a decoder-only model, and its sizes.

    ``quirks`` names the applied :data:`QUIRKS`; ``plain_kv_cache`` is False when one of
    them makes the cache of a forward pass other than plain per-position keys and values;
    ``n_experts`` is the routed experts per MoE layer (0 for a dense model).
    """

    family: str
    n_layers: int
    d_model: int
    vocab_size: int
    embed_path: str = "model.embed_tokens"
    layers_path: str = "model.layers"
    norm_path: str = "model.norm"
    unembed_path: str = "lm_head"
    quirks: tuple[str, ...] = ()
    plain_kv_cache: bool = True
    n_experts: int = 0
    experts_per_token: int = 0

    @classmethod
    def from_config(cls, config: Any, source: str = "") -> Architecture:
        """The adapter for a transformers config, found on the model built on meta weights
        (no memory, no forward); :class:`BadInput` in one line for a refused family."""
        from transformers import AutoModelForCausalLM

        family = str(getattr(config, "model_type", None))
        if getattr(config, "is_encoder_decoder", False):
            raise _refuse(family, "an encoder-decoder model, not a decoder-only one", source)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError, ImportError) as exc:
            raise _refuse(family, f"transformers has no causal LM for it ({type(exc).__name__})",
                          source) from None
        return cls.discover(model, source)

    @classmethod
    def discover(cls, model: torch.nn.Module, source: str = "") -> Architecture:
        """The adapter of a loaded transformers causal LM, checked on a short forward pass
        unless its weights are on the meta device; :class:`BadInput` if it cannot be."""
        config = model.config
        text = config.get_text_config()
        family = str(config.model_type)
        n_layers = int(text.num_hidden_layers)
        embed, unembed = model.get_input_embeddings(), model.get_output_embeddings()
        if embed is None or unembed is None:
            raise _refuse(family, "no input or output embedding (get_input_embeddings / "
                          "get_output_embeddings)", source)
        blocks = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
        if len(blocks) > 1:  # keep the blocks that sit beside the embedding
            blocks = [(name, m) for name, m in blocks
                      if _module_path(model, embed).rpartition(".")[0] == name.rpartition(".")[0]]
        if len(blocks) != 1:
            raise _refuse(family, f"found {len(blocks)} module lists of its {n_layers} "
                          "decoder blocks, expected one", source)
        layers_path = blocks[0][0]
        parent = layers_path.rpartition(".")[0]
        decoder = model.get_submodule(parent) if parent else model
        norms = [name for name, m in decoder.named_children() if "norm" in type(m).__name__.lower()]
        if len(norms) != 1:
            raise _refuse(family, f"found {len(norms)} norms beside the decoder blocks "
                          "(expected one final norm)", source)
        quirks = tuple(name for name, quirk in QUIRKS.items() if quirk.applies(text))
        arch = cls(
            family=family, n_layers=n_layers, d_model=int(text.hidden_size),
            vocab_size=int(text.vocab_size),
            embed_path=str(_module_path(model, embed)), layers_path=layers_path,
            norm_path=f"{parent}.{norms[0]}" if parent else norms[0],
            unembed_path=str(_module_path(model, unembed)), quirks=quirks,
            plain_kv_cache=not any(QUIRKS[q].breaks_kv_cache for q in quirks),
            n_experts=int(_config_value(text, "num_experts", "num_local_experts",
                                        "n_routed_experts") or 0),
            experts_per_token=int(_config_value(text, "num_experts_per_tok") or 0),
        )
        if getattr(model, "hf_device_map", None) or not any(p.is_meta for p in model.parameters()):
            problem = arch.check_on_forward(model)
            if problem:
                raise _refuse(family, problem, source)
            found = padding_quirks(model, arch.vocab_size, family)
            quirks = tuple(q for q in QUIRKS if q in found or (q in quirks and q not in PADDING_QUIRKS))
            arch = replace(arch, quirks=quirks)
        return arch

    @property
    def pads_decode(self) -> bool:
        """Whether left padding leaves generation's cached decode steps unchanged."""
        return "padded-decode" not in self.quirks and self.pads_forward

    @property
    def pads_forward(self) -> bool:
        """Whether left padding leaves a forward pass unchanged."""
        return "padded-forward" not in self.quirks

    def batches(self, lengths: Sequence[int], batch_size: int, *,
                decode: bool = False) -> list[list[int]]:
        """The indices of sequences of these ``lengths`` in batches of ``batch_size``,
        longest first (the least padding). Where left padding changes this family's outputs
        (:attr:`pads_forward`; with ``decode``, :attr:`pads_decode`), only sequences of equal
        length share a batch, and a one-line note on stderr says so when that adds batches."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        plain = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if self.pads_decode if decode else self.pads_forward:
            return plain
        same: dict[int, list[int]] = {}
        for i in order:
            same.setdefault(lengths[i], []).append(i)
        batches = [group[i:i + batch_size] for group in same.values()
                   for i in range(0, len(group), batch_size)]
        if len(batches) > len(plain):
            quirk = "padded-decode" if decode and self.pads_forward else "padded-forward"
            say(f"{self.family}: left padding changes its outputs ({quirk}), so only sequences "
                f"of equal length share a batch: {len(batches)} batches instead of {len(plain)}")
        return batches

    def check_on_forward(self, model: torch.nn.Module) -> str | None:
        """What is wrong with the found parts on a short forward pass of ``model``, or None:
        each block's output must be the residual stream (``output_hidden_states``) and the
        final norm must take the last block's output and feed the unembedding."""
        seen: dict[str, Any] = {}
        blocks = self.layers(model)

        def keep(name: str, pre: bool = False) -> Callable:
            return lambda module, args, out=None: seen.setdefault(name, args[0] if pre else out)

        handles = [block.register_forward_hook(keep(f"block{i}")) for i, block in enumerate(blocks)]
        norm = self.final_norm(model)
        handles += [norm.register_forward_pre_hook(keep("norm_in", True)),
                    norm.register_forward_hook(keep("norm_out")),
                    self.unembed(model).register_forward_pre_hook(keep("head_in", True))]
        ids = (torch.arange(5, 12) * 7919 % self.vocab_size)[None]
        device = self.embed(model).weight.device
        try:
            with torch.no_grad():
                out = model(input_ids=ids.to("cpu" if device.type == "meta" else device),
                            output_hidden_states=True, use_cache=False)
        except Exception as exc:  # any failure of the model's own forward
            return f"a forward pass with its blocks found failed ({type(exc).__name__}: {first_line(exc)})"
        finally:
            for handle in handles:
                handle.remove()
        outputs = [seen.get(f"block{i}") for i in range(self.n_layers)]
        if not all(isinstance(o, torch.Tensor) for o in outputs):
            return "its decoder blocks do not return the residual stream as a tensor"
        hidden = out.hidden_states
        for i in range(self.n_layers - 1):
            if not torch.equal(outputs[i].cpu(), hidden[i + 1].cpu()):
                return f"decoder block {i}'s output is not output_hidden_states[{i + 1}]"
        if not torch.equal(seen["norm_in"].cpu(), outputs[-1].cpu()):
            return f"{self.norm_path} does not take the last decoder block's output"
        head_in = seen["head_in"]
        if not torch.equal(seen["norm_out"][:, -head_in.shape[1]:].cpu(), head_in.cpu()):
            return f"{self.norm_path}'s output is not what {self.unembed_path} reads"
        return None

    def embed(self, model: Any) -> Any:
        """The token embedding."""
        return _resolve(model, self.embed_path)

    def layers(self, model: Any) -> Any:
        """The decoder blocks of ``model`` (an nnsight model or a plain HF model)."""
        return _resolve(model, self.layers_path)

    def final_norm(self, model: Any) -> Any:
        """The norm applied after the last decoder block."""
        return _resolve(model, self.norm_path)

    def unembed(self, model: Any) -> Any:
        """The unembedding (``lm_head``)."""
        return _resolve(model, self.unembed_path)

    def check_layers(self, layers: list[int], what: str = "layer") -> None:
        """Raise :class:`BadInput` if any layer index is outside ``0..n_layers-1``."""
        for layer in layers:
            if not 0 <= int(layer) < self.n_layers:
                raise BadInput(
                    f"{what} {layer} is out of range: the model has layers 0..{self.n_layers - 1}"
                )

    def summary(self) -> dict[str, Any]:
        """What ``nnsteer models`` prints about the architecture, line by line."""
        experts = (f"{self.n_experts} routed per MoE layer, {self.experts_per_token} per token"
                   if self.n_experts else "none (dense)")
        return {
            "family": self.family,
            "quirks": ", ".join(self.quirks) or "none",
            "layers": self.n_layers,
            "width": self.d_model,
            "vocab": self.vocab_size,
            "experts": experts,
            "attribution cache": "one clean forward's KV cache" if self.plain_kv_cache
            else "none (each probe runs on its own prefix)",
        }


#: The padding probe: the long row's length, the short row's, and the cached decode steps.
PADDING_PROBE = (16, 4, 4)


def padding_quirks(model: torch.nn.Module, vocab_size: int, family: str = "model") -> set[str]:
    """Which of :data:`PADDING_QUIRKS` ``model`` has: a batch of a long row and a short
    left-padded one against the short row alone, for a forward pass (``padded-forward``)
    and for the cached decode steps of ``generate`` (``padded-decode``), both forced to the
    same tokens. Their logits may differ by rounding only (:func:`padding_tolerance`). A
    pass that fails on the padded batch counts as changed by the padding, with one line
    naming ``family`` and the error (never silently batch-dependent, never refused for it).
    """
    long, short, steps = PADDING_PROBE
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    device = torch.device("cpu") if device.type == "meta" else device
    pad_id = getattr(model.config.get_text_config(), "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) and 0 <= pad_id < vocab_size else 0
    tokens = (torch.arange(long + short + steps) * 7919 + 11) % vocab_size
    row, forced = tokens[long:long + short], tokens[long + short:].tolist()
    ids = torch.stack([tokens[:long], torch.cat([torch.full((long - short,), pad_id), row])])
    mask = torch.ones_like(ids)
    mask[1, :long - short] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    found = set()
    decode = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1,
                  output_logits=True, return_dict_in_generate=True, pad_token_id=pad_id)

    def force(width: int) -> Callable[[int, torch.Tensor], list[int]]:
        return lambda batch, seen: [forced[min(len(seen) - width, steps - 1)]]

    quirk = "padded-forward"
    try:
        with torch.no_grad():
            padded = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=False).logits[1, long - short:]
            alone = model(input_ids=row[None].to(device), use_cache=False).logits[0]
            if _differ(padded, alone, dtype):
                found.add(quirk)
            quirk = "padded-decode"
            padded = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    prefix_allowed_tokens_fn=force(long), **decode).logits
            alone = model.generate(input_ids=row[None].to(device),
                                   attention_mask=torch.ones(1, short, dtype=torch.long).to(device),
                                   prefix_allowed_tokens_fn=force(short), **decode).logits
    except Exception as exc:  # the model's own forward or generate
        say(f"{family}: a left-padded batch failed ({type(exc).__name__}: {first_line(exc)}): "
            f"counted as {quirk}")
        return found | {quirk}
    if any(_differ(p[1], a[0], dtype) for p, a in zip(padded, alone)):
        found.add(quirk)
    return found


def padding_tolerance(dtype: torch.dtype) -> float:
    """How far, relative to the largest logit, a padded row's logits may stray from the
    row's own by rounding: 8 ulps of ``dtype`` (bfloat16 0.0625), at least 1e-3."""
    return max(1e-3, 8 * torch.finfo(dtype).eps)


def _differ(padded: torch.Tensor, alone: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``padded`` strays from ``alone`` by more than rounding in a model of ``dtype``."""
    scale = alone.float().abs().max().clamp(min=1e-6)
    gap = (padded.float() - alone.float()).abs().max()
    return bool((gap / scale).cpu() > padding_tolerance(dtype))


def _resolve(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
