"""Data pipeline benchmark: tokenizer training, tokenization throughput, loader throughput.

    python benchmarks/bench_data.py [--vocab-size 32000] [--tokenizer DIR] [--repeat 3] [--json OUT.json]

On the built-in corpus (Python's own documentation, zero download) it measures, in one run:

1. training a byte-level BPE tokenizer of --vocab-size (skipped when --tokenizer is given);
2. tokenization, side by side over the same documents:
   - single: one process, a plain ``tokenizer.encode`` loop (the baseline);
   - encode_batch: ``encode_batch_fast`` (the Rust tokenizer's own thread pool, all cores);
   - prepare: the whole ``data prepare`` path (jsonl read, tokenize, pack, shard, counts,
     manifest) from a jsonl dump of the corpus, with workers=0 (Rust threads) and
     workers=<cores> (processes);
3. the training loader (batch 8 x seq 2048, shuffled, with and without position ids) and the
   eval loader, in tokens per second.

Each timing is the best of --repeat runs; the four tokenization methods run interleaved, round
by round, so that other load on the machine affects them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def best_of_interleaved(repeat: int, fns: dict) -> tuple[dict, dict]:
    """Best time and last result of each function, run round by round (each round in the
    opposite order to the one before), so that a change of machine load hits all of them alike."""
    times = {name: [] for name in fns}
    results = {}
    order = list(fns)
    for r in range(repeat):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            results[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--tokenizer", default=None, help="use this tokenizer folder instead of training one")
    ap.add_argument(
        "--min-frequency",
        type=int,
        default=1,
        help="BPE min merge frequency (1: the 3 MB corpus fills a 32k vocabulary; 2 stops near 23k)",
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--loader-batches", type=int, default=300)
    ap.add_argument("--workdir", default=None, help="keep outputs here (default: a temp folder, removed)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    import numpy as np
    import tokenizers
    import torch

    from complexity.data import builtin_corpus
    from complexity.data.loader import EvalLoader, TrainLoader
    from complexity.data.prepare import prepare_dataset
    from complexity.data.tokenizer import load_tokenizer, train_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data-"))
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    res: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "cpu_cores": cores,
        "platform": platform.platform(),
    }
    res["load_average_start"] = os.getloadavg()
    print(
        f"python {res['python']}, torch {res['torch']}, tokenizers {res['tokenizers']}, {cores} CPU cores, "
        f"load average {res['load_average_start'][0]:.2f} (other processes skew the timings)"
    )

    t0 = time.perf_counter()
    docs = list(builtin_corpus.iter_documents())
    res["corpus_build_s"] = time.perf_counter() - t0
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    res.update(corpus_documents=len(docs), corpus_bytes=nbytes)
    print(
        f"built-in corpus: {len(docs)} documents, {nbytes:,} bytes ({nbytes / 2**20:.2f} MiB), "
        f"built in {res['corpus_build_s']:.1f}s"
    )

    if args.tokenizer:
        tok_dir = Path(args.tokenizer)
    else:
        tok_dir = work / f"tok{args.vocab_size}"
        shutil.rmtree(tok_dir, ignore_errors=True)
        t0 = time.perf_counter()
        train_tokenizer(docs, args.vocab_size, tok_dir, min_frequency=args.min_frequency, show_progress=False)
        res["tokenizer_train_s"] = time.perf_counter() - t0
    res["vocab_size"] = load_tokenizer(tok_dir).get_vocab_size()
    if "tokenizer_train_s" in res:
        print(
            f"trained a {res['vocab_size']}-token BPE (min frequency {args.min_frequency}) on the built-in corpus "
            f"in {res['tokenizer_train_s']:.1f}s"
        )

    # ---- tokenization
    def single():
        tok = load_tokenizer(tok_dir)  # fresh instance: cold BPE cache, like the others
        return sum(len(tok.encode(d, add_special_tokens=False).ids) for d in docs)

    def batched():
        tok = load_tokenizer(tok_dir)
        return sum(len(e.ids) for e in tok.encode_batch_fast(docs, add_special_tokens=False))

    jsonl = work / "builtin.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")

    def prep(workers):
        def run():
            out = work / f"prepared-w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            return prepare_dataset([str(jsonl)], tok_dir, out, workers=workers, progress=False, log=lambda m: None)

        return run

    best, results = best_of_interleaved(
        args.repeat, {"single": single, "batch": batched, "prep0": prep(0), "prepn": prep(cores)}
    )
    t_single, t_batch, t_prep0, t_prepn = best["single"], best["batch"], best["prep0"], best["prepn"]
    n_tokens, r0, rn = results["single"], results["prep0"], results["prepn"]
    assert results["batch"] == n_tokens
    assert r0.manifest["tokens"] == rn.manifest["tokens"] == n_tokens + len(docs)
    res.update(
        tokens=n_tokens,
        single_s=t_single,
        encode_batch_s=t_batch,
        prepare_rust_threads_s=t_prep0,
        prepare_processes_s=t_prepn,
    )

    print(f"\ntokenization of the same text (best of {args.repeat}, interleaved):")
    print(f"{'method':<40} {'seconds':>8} {'tokens/s':>12} {'MB/s':>7} {'vs single':>9}")
    rows = [
        ("single process tokenizer.encode loop", t_single),
        ("encode_batch_fast (Rust threads)", t_batch),
        ("data prepare, workers=0 (Rust threads)", t_prep0),
        (f"data prepare, workers={cores} (processes)", t_prepn),
    ]
    for name, t in rows:
        print(f"{name:<40} {t:>8.2f} {n_tokens / t:>12,.0f} {nbytes / t / 1e6:>7.2f} {t_single / t:>8.2f}x")
    res["speedup_prepare_best_vs_single"] = t_single / min(t_prep0, t_prepn)

    # ---- loader
    data_dir = work / "prepared-w0"
    bs, sl = args.batch_size, args.seq_len

    def loader_rate(position_ids: bool):
        loader = TrainLoader(data_dir, batch_size=bs, seq_len=sl, seed=0, position_ids=position_ids)
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        n = 0
        for _ in range(args.loader_batches):
            n += next(it)["input_ids"].numel()
        return n / (time.perf_counter() - t0)

    res["loader_tokens_per_s"] = max(loader_rate(False) for _ in range(args.repeat))
    res["loader_position_ids_tokens_per_s"] = max(loader_rate(True) for _ in range(args.repeat))

    def eval_rate():
        ev = EvalLoader(data_dir, split="train", batch_size=bs, seq_len=sl)
        t0 = time.perf_counter()
        n = sum(b["input_ids"].numel() for b in ev)
        return n / (time.perf_counter() - t0)

    res["eval_loader_tokens_per_s"] = max(eval_rate() for _ in range(args.repeat))
    print(f"\nloader, batch {bs} x seq {sl} (train split {r0.manifest['splits']['train']['tokens']:,} tokens):")
    print(f"  TrainLoader                  {res['loader_tokens_per_s'] / 1e6:8.1f} M tokens/s")
    print(f"  TrainLoader + position_ids   {res['loader_position_ids_tokens_per_s'] / 1e6:8.1f} M tokens/s")
    print(f"  EvalLoader (sequential)      {res['eval_loader_tokens_per_s'] / 1e6:8.1f} M tokens/s")

    res["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {res['load_average_end'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
