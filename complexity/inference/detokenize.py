"""Incremental detokenization and stop-string matching for streamed output.

Byte-level BPE can split one UTF-8 character over several tokens; decoding token by token would
print replacement characters. The detokenizer decodes a short window ending at the new token
and emits only the text that is complete (no trailing U+FFFD), carrying a few prompt tokens as
left context so that tokenizers that drop a leading space on the first token decode correctly.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end), decoded with replacement."""
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


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
                out = self.text[self.emitted:end]
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
        out = self.text[self.emitted:end]
        self.emitted = end
        return out, False


__all__ = ["IncrementalDetokenizer", "StopMatcher"]
