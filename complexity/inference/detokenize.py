"""Text from token outputs: incremental detokenization, stop strings, one batched decode per step.

The engine produces token ids only; `OutputProcessor` turns each step's `StepOutput`s into text
deltas. In the server it runs in the API process (vLLM v1's split), so decoding never delays the
model loop; in-process (`Engine.generate` / `stream`) it runs after each step.

- A request that streams, or has stop strings, is detokenized incrementally: byte-level BPE can
  split one UTF-8 character over several tokens, so each step decodes a short window ending at the
  new token and emits only complete text (no trailing U+FFFD), with a few prompt tokens as left
  context (tokenizers that drop a leading space on the first token then decode correctly).
- Any other request is decoded once, when it finishes.
- All the windows of one step go to the Rust tokenizer in one `decode_batch` call.
- A stop string ends the request with finish_reason "stop"; `process` returns its id so the
  caller aborts it in the engine.
"""

from __future__ import annotations

from .outputs import StepOutput
from .sampling import SamplingParams

_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """The window bookkeeping of one request. `window()` after `push()` is the text to decode;
    `commit(prefix_text, window_text)` returns the completed delta."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.prefix_text: str | None = None  # decode(ids[prefix_offset:read_offset]), cached

    def push(self, token_id: int) -> None:
        self.ids.append(int(token_id))

    def prefix_window(self) -> list[int]:
        return self.ids[self.prefix_offset : self.read_offset]

    def window(self) -> list[int]:
        return self.ids[self.prefix_offset :]

    def commit(self, prefix_text: str, new_text: str) -> str:
        self.prefix_text = prefix_text
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.prefix_text = None
            return delta
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty). Unbatched."""
        self.push(token_id)
        prefix = self.prefix_text if self.prefix_text is not None else self._decode(self.prefix_window())
        return self.commit(prefix, self._decode(self.window()))

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end), decoded with replacement."""
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text = self._decode(self.prefix_window())
        new_text = self._decode(self.window())
        self.prefix_offset = self.read_offset = len(self.ids)
        self.prefix_text = None
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Accumulates text; finds the first stop string; holds back a tail that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # all text so far (before truncation)
        self.emitted = 0  # characters already released

    def feed(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """-> (text to release now, stopped)."""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += delta
        if self.stops:
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                end = max(min(hits), self.emitted)
                out = self.text[self.emitted : end]
                self.text = self.text[:end]
                self.emitted = end
                return out, True
        end = len(self.text)
        if not final and self.stops:
            # hold back the longest suffix that is a prefix of a stop string
            for s in self.stops:
                for n in range(min(len(s) - 1, len(self.text) - self.emitted), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        out = self.text[self.emitted : end]
        self.emitted = end
        return out, False


class _State:
    __slots__ = ("detok", "stopper", "context", "ids", "skip", "done")

    def __init__(self, tokenizer, prompt_ids, params: SamplingParams, incremental: bool):
        self.skip = params.skip_special_tokens
        self.stopper = StopMatcher(params.stop) if params.stop else None
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, self.skip) if (incremental or params.stop) else None
        self.context = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.ids: list[int] = []  # decoded-at-the-end requests: the tokens so far
        self.done = False


def _merge_by_request(outputs: list[StepOutput]) -> list[StepOutput]:
    """One output per request: a request prefilled and decoded in the same step has two, and
    its tokens must be decoded as one window."""
    if len({o.request_id for o in outputs}) == len(outputs):
        return outputs
    merged: dict[str, StepOutput] = {}
    for o in outputs:
        prev = merged.get(o.request_id)
        if prev is None:
            merged[o.request_id] = o
            continue
        logprobs = (prev.new_logprobs or []) + (o.new_logprobs or []) if (prev.new_logprobs or o.new_logprobs) else None
        merged[o.request_id] = o._replace(
            new_token_ids=prev.new_token_ids + o.new_token_ids,
            new_logprobs=logprobs,
            prompt_logprobs=prev.prompt_logprobs if o.prompt_logprobs is None else o.prompt_logprobs,
        )
    return list(merged.values())


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._batch = backend.decode_batch if backend is not None else None
        self._states: dict[str, _State] = {}

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, incremental: bool) -> None:
        if self.tokenizer is not None:
            self._states[request_id] = _State(self.tokenizer, prompt_ids, params, incremental)

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def _decode_batch(self, seqs: list[list[int]], skips: list[bool]) -> list[str]:
        texts: list[str] = [""] * len(seqs)
        for skip in (True, False):
            idx = [i for i, s in enumerate(skips) if s == skip]
            if not idx:
                continue
            batch = [seqs[i] for i in idx]
            if self._batch is not None:
                decoded = self._batch(batch, skip_special_tokens=skip)
            else:
                decoded = self.tokenizer.batch_decode(
                    batch, skip_special_tokens=skip, clean_up_tokenization_spaces=False
                )
            for i, t in zip(idx, decoded):
                texts[i] = t
        return texts

    def process(self, outputs: list[StepOutput]) -> tuple[list[StepOutput], list[str]]:
        """-> (the outputs with their text, ids of requests a stop string ended: abort them in the
        engine). Outputs of requests already ended by a stop string are dropped."""
        if not self._states:
            return outputs, []
        outputs = _merge_by_request(outputs)
        result: list[StepOutput] = []
        todo = []  # (position in result, state, output, its windows in seqs: (first, count) or None)
        seqs, skips = [], []
        for out in outputs:
            st = self._states.get(out.request_id)
            if st is None:
                result.append(out)
                continue
            if st.done:  # already ended by a stop string
                continue
            toks = _text_tokens(out)
            if st.stopper is not None and len(toks) > 1:
                # several tokens at once (a window of decode steps): matched one token at a time,
                # so the output ends at the token that completed a stop string, as with one per step
                todo.append((len(result), st, out, None))
            elif st.detok is None:
                st.ids.extend(toks)
                if not out.finished:  # decoded once, at the end: nothing to do now (the common case)
                    result.append(out)
                    continue
                todo.append((len(result), st, out, (len(seqs), 2)))
                seqs += [st.context, st.context + st.ids]
            else:
                first = len(seqs)
                for t in toks:
                    st.detok.push(t)
                if toks:
                    if st.detok.prefix_text is None:
                        seqs.append(st.detok.prefix_window())
                    seqs.append(st.detok.window())
                todo.append((len(result), st, out, (first, len(seqs) - first)))
            skips += [st.skip] * (len(seqs) - len(skips))
            result.append(out)
        texts = self._decode_batch(seqs, skips) if seqs else []
        stopped = []
        for pos, st, out, window in todo:
            if window is None:
                text, hit, out = _match_token_by_token(st, out)
            else:
                text = _window_text(st, out, texts, *window)
                hit = False
                if st.stopper is not None:
                    text, hit = st.stopper.feed(text, final=out.finished)
            finished, reason = out.finished, out.finish_reason
            if hit:
                if not finished:
                    stopped.append(out.request_id)
                finished, reason = True, "stop"
            st.done = finished
            result[pos] = out._replace(new_text=text, finished=finished, finish_reason=reason)
        return result, stopped


def _text_tokens(out: StepOutput) -> list[int]:
    """The output's tokens that are text: an eos / stop token ending the request is not."""
    toks = out.new_token_ids
    return toks[:-1] if out.finished and out.finish_reason == "stop" and toks else toks


def _window_text(st: _State, out: StepOutput, texts: list[str], first: int, n: int) -> str:
    """The output's new text from the batched decode of its windows texts[first : first + n]."""
    if st.detok is None:  # decoded once, at the end: the whole text after the prompt's context
        return texts[first + 1][len(texts[first]) :]
    text = ""
    if n:
        prefix = texts[first] if n == 2 else st.detok.prefix_text
        text = st.detok.commit(prefix, texts[first + n - 1])
    if out.finished:
        text += st.detok.flush()
    return text


def _match_token_by_token(st: _State, out: StepOutput) -> tuple[str, bool, StepOutput]:
    """(text released, whether a stop string ended it, the output cut after the token that
    completed the stop string: its tokens, logprobs and count end there)."""
    text = ""
    for n, t in enumerate(_text_tokens(out), 1):
        released, hit = st.stopper.feed(st.detok.add(t))
        text += released
        if hit:
            dropped = len(out.new_token_ids) - n
            return (
                text,
                True,
                out._replace(
                    new_token_ids=out.new_token_ids[:n],
                    new_logprobs=None if out.new_logprobs is None else out.new_logprobs[:n],
                    num_generated_tokens=out.num_generated_tokens - dropped,
                ),
            )
    if not out.finished:
        return text, False, out
    released, hit = st.stopper.feed(st.detok.flush(), final=True)
    return text + released, hit, out


__all__ = ["IncrementalDetokenizer", "OutputProcessor", "StopMatcher"]
