"""How a conversation becomes tokens (`PromptFormat`: context, query and answer segments cut from the
tokenizer's chat template, or plain text) and where generation stops (`stop_token_ids`)."""

from __future__ import annotations

from typing import Any


class PromptFormat:
    """Splits a conversation into token segments: context, query, answer.

    In chat format the tokenizer's chat template is rendered with marker strings and cut at them,
    so that context + query segments concatenate to exactly the template's text.
    """

    CTX, Q1, A1, Q2 = "\x01CTX\x01", "\x02Q1\x02", "\x03A1\x03", "\x04Q2\x04"

    def __init__(self, tokenizer: Any, style: str = "chat", system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.style = style if style == "plain" or getattr(tokenizer, "chat_template", None) else "plain"
        self.system_prompt = system_prompt
        if self.style == "chat":
            self._split_template()

    def _render(self, messages: list[dict[str, str]]) -> str:
        if self.system_prompt is not None:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _split_template(self) -> None:
        first = self._render([{"role": "user", "content": self.CTX + self.Q1}])
        second = self._render([
            {"role": "user", "content": self.CTX + self.Q1},
            {"role": "assistant", "content": self.A1},
            {"role": "user", "content": self.Q2},
        ])
        try:
            self.head = first[: first.index(self.CTX)]
            self.after_query = first[first.index(self.Q1) + len(self.Q1):]
            self.after_answer = second[second.index(self.A1) + len(self.A1): second.index(self.Q2)]
            after_q2 = second[second.index(self.Q2) + len(self.Q2):]
        except ValueError:
            self.style = "plain"
            return
        if after_q2 != self.after_query:
            self.style = "plain"

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def context_ids(self, context: str) -> list[int]:
        if self.style == "chat":
            return self.encode(self.head + context + "\n\n")
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return ([bos] if bos is not None else []) + self.encode(context + "\n\n")

    def segment_ids(self, segments: list[str]) -> tuple[list[list[int]], list[int]]:
        """A context given as segments, each tokenized on its own: ([head + first segment, then one list per
        later segment], the tail that closes the context)."""
        pieces = [self.head_ids() + self.encode(segments[0])] + [self.encode(text) for text in segments[1:]]
        return pieces, self.encode("\n\n")

    def head_ids(self) -> list[int]:
        """The tokens every context starts with (chat template and system prompt, or BOS)."""
        if self.style == "chat":
            return self.encode(self.head)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [bos] if bos is not None else []

    def query_ids(self, query: str) -> list[int]:
        if self.style == "chat":
            return self.encode(query + self.after_query)
        return self.encode(query + "\n")

    def answer_ids(self, answer: str) -> list[int]:
        if self.style == "chat":
            return self.encode(answer + self.after_answer)
        return self.encode(answer + "\n\n")

    def reference_ids(self, answer: str) -> list[int]:
        return self.encode(answer)


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
    for token in ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<eos>"):
        convert = getattr(tokenizer, "convert_tokens_to_ids", None)
        token_id = convert(token) if convert else None
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(token_id, int) and token_id != unk:
            ids.add(token_id)
    return ids
