"""NDIF requests and bytes per stage, today's code against this code, at paper-llama-8b shapes.

A small study (``--train`` chains, ``--eval`` steered tasks, ``--tokens`` new tokens each)
runs every remote stage (generate, extract, attribute, steer) through the loopback NDIF of
``tests/fake_ndif.py`` (nnsight's real client over HTTP, NDIF main's sandbox, bf16
autocast) on a random Llama as wide and deep as Llama-3.1-8B (32 layers × 4096) but with
one tiny attention head and MLP, in bf16, so it runs on a CPU. Per stage it counts the jobs
sent, the bytes up (request bodies) and down (result bodies), and the *distinct data* the
stage must send at least: token ids at 4 bytes each (prompt ids for generate and steer,
chain ids for extract and attribute, up to the last position used), each sample's or
probe's position and label at 4 bytes each, and every vector once, in the model's dtype.

"Today" is the code of ``--baseline`` (a git revision, default ``b3df61f``, the commit this
branch started from), exported with ``git archive`` and run in a subprocess on the same
study; "after" is the working tree. Both runs' outputs are compared (chains equal;
vectors and effects equal bit for bit, both being bf16 autocast on the same fake server).

The 8B and 70B tables extrapolate to a ``configs/paper-llama-8b.toml`` study (300 chains
of 500 tokens, batch 8): per stage, jobs from the batching rules, and bytes up as jobs ×
the measured per-job *excess* (request bytes minus the distinct data it carried: code,
module tree, pickling, derivable tensors) plus the study's distinct data; for 70B (80
layers × 8192) the excess scales with the layer count and the vectors with layers × width.
These formulas are ``nnsteer plan``'s (``nnsteer.pipeline.plan``: ``ndif_jobs``,
``ndif_distinct``, ``ndif_upload``), one source for both; the last lines check its job
formulas against the jobs this run sent, and print the per-job excess measured now beside
the constants the plan holds (``NDIF_EXCESS``).

Usage: ``python bench/bench_ndif.py [--train 8] [--eval 1] [--tokens 12] [--batch 4]
[--out bench/results/ndif.txt]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "extract", "attribute", "steer")
LABELS = ("backtracking", "uncertainty-estimation", "example-testing", "adding-knowledge")
STEERED = ("backtracking", "uncertainty-estimation")


def paper_shaped_model(tokenizer):
    """A random bf16 Llama of 32 layers × 4096 with one 16-wide head and a 16-wide MLP."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nnsteer.modeling.models import wrap_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=16,
                         num_hidden_layers=32, num_attention_heads=1, num_key_value_heads=1,
                         head_dim=16, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, initializer_range=0.02)
    hf = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return wrap_model(hf, tokenizer, name="test/paper-shaped-llama", revision="bench")


def spans_by_quarter(run, lm) -> None:
    """Hand-placed annotations: each chain's response cut in quarters, labels in turn."""
    import polars as pl

    from nnsteer.runs.store import provenance, write_parquet

    chains = pl.read_parquet(run.chains)
    rows = []
    for n, (chain_id, response) in enumerate(zip(chains["chain_id"], chains["response"])):
        edges = [len(response) * k // 4 for k in range(5)]
        for k in range(4):
            if edges[k] < edges[k + 1]:
                rows.append({"chain_id": chain_id, "label": LABELS[(n + k) % 4],
                             "start": edges[k], "end": edges[k + 1],
                             "text": response[edges[k]:edges[k + 1]], "annotator": "bench",
                             "status": "ok"})
    write_parquet(pl.DataFrame(rows), run.annotations, provenance("annotate", {}, lm.provenance()))


def distinct_bytes(stage: str, run, lm) -> int:
    """The data ``stage`` must send at least (module doc)."""
    import polars as pl

    from nnsteer.vectors.extract import load_vectors

    width = 2 if "bfloat16" in str(lm.dtype) or "float16" in str(lm.dtype) else 4
    if stage in ("generate", "steer"):
        table = pl.read_parquet(run.chains if stage == "generate" else run.path("steered.parquet"))
        prompts = table.unique("task_id") if stage == "steer" else table
        ids = 4 * int(prompts["prompt_ids"].list.len().sum())
        if stage == "generate":
            return ids
        layers = json.loads(run.layers.read_text())
        steered_layers = sum(len(choice["layers"]) for choice in layers.values())
        return ids + steered_layers * lm.arch.d_model * width  # each behaviour's vector once
    chains = pl.read_parquet(run.chains)
    tokens = 4 * int((chains["prompt_ids"].list.len() + chains["output_ids"].list.len()).sum())
    if stage == "extract":
        samples = pl.read_parquet(run.annotations).height + chains.height  # + "overall"
        return tokens + 8 * samples
    spans = pl.read_parquet(run.path("attribution_spans.parquet"))
    n_labels = spans["label"].n_unique()
    vector = load_vectors(run.vectors)
    return tokens + 8 * spans.height + n_labels * vector.n_layers * vector.d_model * width


def run_study(args) -> dict:
    """Every stage on the loopback NDIF; per stage: jobs, bytes up and down, distinct bytes,
    and a digest of its output. Runs with whichever ``nnsteer`` is importable."""
    import hashlib

    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from fake_ndif import fake_ndif, served  # noqa: E402

    from nnsteer.generation import chains as generation
    from nnsteer.modeling.embedded import embedded_dir
    from nnsteer.runs.store import RunDir, write_json
    from nnsteer.selection import attribution
    from nnsteer.steer import chains as steer
    from nnsteer.tasks import files as tasks
    from nnsteer.vectors import extract as vectors

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir("smollm2-135m"))
    lm = paper_shaped_model(tokenizer)
    run = RunDir(Path(tempfile.mkdtemp(prefix="bench-ndif-")))
    prompts = [f"What is {a} times {a + 3}? Explain each step." for a in range(args.train)]
    prompts += [f"Is {a} a prime number? Check it." for a in range(args.eval)]
    records = [{"task_id": f"t{i}", "category": "Arithmetic", "source": "file", "prompt": p,
                "split": "train" if i < args.train else "eval"} for i, p in enumerate(prompts)]
    tasks.save_tasks(run, tasks.tasks_frame(records), {})
    stages = {
        "generate": lambda: generation.generate_chains(
            run, lm, max_new_tokens=args.tokens, batch_size=args.batch),
        "extract": lambda: vectors.extract_vectors(run, lm, batch_size=args.batch),
        "attribute": lambda: attribution.attribute(run, lm, metric="nll",
                                                   batch_size=args.batch, labels=list(LABELS)),
        "steer": lambda: steer.steer_chains(run, lm, behaviours=list(STEERED),
                                            random_control=False, max_new_tokens=args.tokens,
                                            batch_size=args.batch),
    }
    outputs = {"generate": "chains.parquet", "extract": "vectors.safetensors",
               "attribute": "attribution_spans.parquet", "steer": "steered.parquet"}
    report = {}
    with fake_ndif({served(lm, lm.name): lm.nn}) as ndif:
        lm.remote = True
        for stage, call in stages.items():
            before, records_before = ndif.submitted(), len(ndif.requests)
            started = time.perf_counter()
            call()
            seconds = time.perf_counter() - started
            done = ndif.requests[records_before:]
            if stage == "generate":
                spans_by_quarter(run, lm)
            if stage == "extract":
                write_json(run.layers, {b: {"vector_layer": 16, "layers": [15, 16, 17],
                                            "coefficient": 2.0} for b in STEERED})
            report[stage] = {
                "jobs": ndif.submitted() - before,
                "up": sum(r.request_bytes for r in done),
                "down": sum(r.response_bytes for r in done),
                "distinct": distinct_bytes(stage, run, lm),
                "seconds": round(seconds, 1),
                "digest": _digest(run.path(outputs[stage]), hashlib, torch),
            }
    return report


def _digest(path: Path, hashlib, torch) -> str:
    """A hash of a stage's result: its tensors, or its table without timing columns."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        h = hashlib.sha256()
        for name in sorted(tensors):
            h.update(name.encode() + tensors[name].float().numpy().tobytes())
        return h.hexdigest()[:16]
    import polars as pl

    table = pl.read_parquet(path)
    keep = [c for c in table.columns if c in ("chain_id", "output_ids", "effects", "label",
                                               "position", "direction")]
    return hashlib.sha256(repr(table.select(keep).rows()).encode()).hexdigest()[:16]


def measure(tree: Path, args) -> dict:
    """:func:`run_study` in a subprocess importing ``nnsteer`` from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(Path(__file__).resolve()), "--study-json",
               "--train", str(args.train), "--eval", str(args.eval), "--tokens",
               str(args.tokens), "--batch", str(args.batch)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"study with {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_tree(revision: str) -> Path:
    """``nnsteer`` as of ``revision``, exported from git into a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="bench-ndif-baseline-"))
    archive = folder / "nnsteer.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", revision, "nnsteer"], stdout=out,
                       check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def megabytes(n: float) -> str:
    return f"{n / 1e6:8.2f}"


def table(today: dict, after: dict) -> list[str]:
    lines = [f"{'stage':<10} {'jobs':>9} {'MB up':>19} {'MB down':>19} {'distinct MB':>11} "
             f"{'up/distinct':>15}  {'same result':>11}",
             f"{'':<10} {'today':>4} {'now':>4} {'today':>9} {'now':>9} {'today':>9} {'now':>9} "
             f"{'':>11} {'today':>7} {'now':>7}"]
    totals = {key: [0, 0] for key in ("jobs", "up", "down", "distinct")}
    for stage in STAGES:
        old, new = today[stage], after[stage]
        for key in totals:
            totals[key][0] += old[key]
            totals[key][1] += new[key]
        lines.append(
            f"{stage:<10} {old['jobs']:>5} {new['jobs']:>4} {megabytes(old['up'])} "
            f"{megabytes(new['up'])} {megabytes(old['down'])} {megabytes(new['down'])} "
            f"{megabytes(new['distinct']):>11} {old['up'] / old['distinct']:>7.1f} "
            f"{new['up'] / new['distinct']:>7.1f}  {str(old['digest'] == new['digest']):>11}")
    t = totals
    lines.append(
        f"{'total':<10} {t['jobs'][0]:>5} {t['jobs'][1]:>4} {megabytes(t['up'][0])} "
        f"{megabytes(t['up'][1])} {megabytes(t['down'][0])} {megabytes(t['down'][1])} "
        f"{megabytes(t['distinct'][1]):>11} {t['up'][0] / t['distinct'][0]:>7.1f} "
        f"{t['up'][1] / t['distinct'][1]:>7.1f}")
    lines.append(f"jobs now / today {t['jobs'][1] / t['jobs'][0]:.2f}; bytes up now / today "
                 f"{t['up'][1] / t['up'][0]:.2f}")
    return lines


#: A configs/paper-llama-8b.toml study, and the shapes of the two model sizes.
STUDY = {"chains": 300, "tokens": 500, "prompt": 60, "batch": 8, "eval": 100,
         "labels": 4, "spans": 12, "steer_chains_per_task": 5, "steered_layers": 3}
SHAPES = {"8B": (32, 4096), "70B": (80, 8192)}


def extrapolate(measured: dict, args, shape: tuple[int, int], chains_per_request: int,
                batches_per_request: int) -> dict:
    """Jobs and MB up per stage for :data:`STUDY` at ``shape``, by ``nnsteer plan``'s
    formulas (``nnsteer.pipeline.plan``: ``ndif_jobs``, ``ndif_distinct``, ``ndif_upload``)
    with the per-job excess ``measured`` here (``ndif_excess``)."""
    from nnsteer.pipeline import plan

    layers, width = shape
    s = STUDY
    steered = s["eval"] * s["steer_chains_per_task"]
    jobs = {
        "generate": plan.ndif_jobs("generate", s["chains"], s["batch"]),
        "extract": plan.ndif_jobs("extract", s["chains"], s["batch"],
                                  per_request=batches_per_request),
        "attribute": plan.ndif_jobs("attribute", s["chains"], per_request=chains_per_request),
        "steer": plan.ndif_jobs("steer", steered, s["batch"]),
    }
    vectors = {"attribute": s["labels"], "steer": len(STEERED) * s["steered_layers"]}
    out = {}
    for stage in STAGES:
        distinct = plan.ndif_distinct(
            stage, chains=s["eval"] if stage == "steer" else s["chains"], prompt=s["prompt"],
            tokens=s["tokens"], spans=s["spans"], vectors=vectors.get(stage, 0),
            n_layers=layers, d_model=width, dtype_bytes=2)
        excess = per_job_excess(measured, stage)
        vector_bytes = s["labels"] * layers * width * 2 if stage == "attribute" else 0.0
        up = plan.ndif_upload(stage, jobs[stage], distinct, layers, width,
                              vector_bytes=vector_bytes, excess={stage: excess})
        out[stage] = {"jobs": jobs[stage], "up": up, "distinct": distinct}
    return out


def per_job_excess(measured: dict, stage: str) -> float:
    """The bytes per job ``measured`` sent beyond the distinct data (``plan.ndif_excess``;
    attribute's net of the vectors each job carried)."""
    from nnsteer.pipeline import plan

    m = measured[stage]
    bench_vectors = STUDY["labels"] * 32 * 4096 * 2 if stage == "attribute" else 0.0
    return plan.ndif_excess(stage, m["up"], m["distinct"], m["jobs"], bench_vectors)


def plan_check(after: dict, args) -> list[str]:
    """``nnsteer plan``'s NDIF formulas against this run: the jobs its formulas give for the
    study measured here, and the per-job excess its constants hold against the one measured."""
    from nnsteer.pipeline import plan

    steered = args.eval * (1 + len(STEERED) * 2)
    predicted = {
        "generate": plan.ndif_jobs("generate", args.train, args.batch),
        "extract": plan.ndif_jobs("extract", args.train, args.batch),
        "attribute": plan.ndif_jobs("attribute", args.train,
                                    per_request=plan.chains_per_request(len(LABELS))),
        "steer": plan.ndif_jobs("steer", steered, args.batch),
    }
    jobs = ", ".join(f"{stage} {predicted[stage]} (measured {after[stage]['jobs']})"
                     for stage in STAGES)
    same = all(predicted[stage] == after[stage]["jobs"] for stage in STAGES)
    excess = ", ".join(f"{stage} {per_job_excess(after, stage):,.0f} B (plan's constant "
                       f"{plan.NDIF_EXCESS[stage]:,.0f})" for stage in STAGES)
    return [f"nnsteer plan's job formulas on this study: {jobs}: "
            f"{'all equal' if same else 'DIFFERENT'}",
            f"per-job excess now (plan.NDIF_EXCESS): {excess}"]


def extrapolated_table(today: dict, after: dict, args) -> list[str]:
    from nnsteer.selection.attribution import REQUEST_ROWS
    from nnsteer.vectors.residuals import BATCHES_PER_REQUEST

    lines = []
    for name, shape in SHAPES.items():
        old = extrapolate(today, args, shape, 1, 1)
        new = extrapolate(after, args, shape, max(1, REQUEST_ROWS // STUDY["spans"]),
                          BATCHES_PER_REQUEST)
        lines.append(f"{name} ({shape[0]} layers × {shape[1]}), {STUDY['chains']} chains of "
                     f"{STUDY['tokens']} tokens, batch {STUDY['batch']}, {STUDY['eval']} eval "
                     f"tasks × {STUDY['steer_chains_per_task']} steered chains:")
        lines.append(f"  {'stage':<10} {'jobs today':>10} {'jobs now':>8} {'MB up today':>11} "
                     f"{'MB up now':>9} {'distinct MB':>11}")
        for stage in STAGES:
            lines.append(f"  {stage:<10} {old[stage]['jobs']:>10} {new[stage]['jobs']:>8} "
                         f"{old[stage]['up'] / 1e6:>11.1f} {new[stage]['up'] / 1e6:>9.1f} "
                         f"{new[stage]['distinct'] / 1e6:>11.2f}")
        total = {k: (sum(old[s][k] for s in STAGES), sum(new[s][k] for s in STAGES))
                 for k in ("jobs", "up", "distinct")}
        lines.append(f"  {'total':<10} {total['jobs'][0]:>10} {total['jobs'][1]:>8} "
                     f"{total['up'][0] / 1e6:>11.1f} {total['up'][1] / 1e6:>9.1f} "
                     f"{total['distinct'][1] / 1e6:>11.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--eval", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--baseline", default="b3df61f")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--study-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.study_json:
        print(json.dumps(run_study(args)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from _output import emit

    today = measure(baseline_tree(args.baseline), args)
    after = measure(ROOT, args)
    lines = [
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, "
        f"{os.cpu_count()} CPUs; python bench/bench_ndif.py --train {args.train} --eval "
        f"{args.eval} --tokens {args.tokens} --batch {args.batch}",
        f"loopback NDIF (NDIF main's sandbox, bf16 autocast), random bf16 Llama 32 layers × "
        f"4096; today = git {args.baseline}, now = this tree, same study, same run",
        f"{args.train} training chains, {args.eval} eval tasks × {len(STEERED)} behaviours × 2 "
        f"directions + baseline, {args.tokens} new tokens, batch {args.batch}",
        "",
        *table(today, after),
        "",
        "extrapolated (module doc: per-job excess measured above, scaled with layers; "
        "distinct data from the shapes):",
        *extrapolated_table(today, after, args),
        "",
        *plan_check(after, args),
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
