"""Data: tokenizer training, corpus readers, token-shard preparation and the training loader.

Submodules are imported on demand so `import complexity.data` stays light:

- `complexity.data.tokenizer`: byte-level BPE training/saving/loading/hashing
- `complexity.data.sources`: readers for txt / jsonl / parquet / folders / globs / HF datasets
- `complexity.data.builtin_corpus`: the zero-download corpus (Python's own documentation)
- `complexity.data.prepare`: tokenize, pack, shard, manifest, token counts (resumable)
- `complexity.data.manifest`: the prepared folder's manifest: format, checked reader, accessors
- `complexity.data.loader`: memory-mapped, deterministic, resumable training/eval batches
- `complexity.data.files`: atomic writes (temp file, fsync, rename), full-disk errors, checked JSON reads
"""
