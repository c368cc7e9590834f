"""What the simulated model answers: token counts, reply words and test directives.

Token model (shared by both wire formats): a prompt costs ceil(chars / 4) input tokens (system and
every message, at least 1); each reply word is one output token. Reply words are three letters long
so a streamed delta (" sun") is four characters: one token under the same chars/4 rule, which keeps
a client-side estimate of a cut stream equal to what the sim would have reported.

Directives in the user content drive failure paths in tests:
  [[usage:IN,OUT]]  exact input tokens, OUT reply words (still capped by max_tokens)
  [[tokenizer:bytes]] the worst a real tokenizer can do: one input token per UTF-8 byte of every
                    text sent, plus framing (3 tokens, and 4 per message, as OpenAI counts them)
  [[fail:CODE]]     answer with the provider's real error body for that HTTP status
  [[delay:SECONDS]] sleep before answering
  [[pace:SECONDS]]  sleep between streamed deltas (lets tests cancel mid-stream)
  [[malformed]]     200 with a body that does not parse
  [[cut:N]]         stream N deltas, then drop the connection without the final events
  [[fail_times:WHAT:N]] the first N requests carrying this same user text fail, later ones are
                    served: WHAT is an HTTP status (its real error body), `reset` (the
                    connection is reset before any answer) or `cut` (a stream sends its opening
                    events, then drops the connection before any text; a JSON call: reset)
  [[retry_after:S]] an error answer says `retry-after: S` (seconds; also `retry-after-ms`)
  [[down:MODEL:WHAT]] every request for MODEL fails as `fail_times` says WHAT; other models are
                    served (a provider's model out while another provider's is up: fallbacks)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_REPLY_WORDS = 12
# Three letters each: a streamed " sun" is four characters, one token by the chars/4 rule.
_VOCABULARY = "the sun set low and sky was red all day you ask for our new way see how far can run"
_WORDS = tuple(_VOCABULARY.split())
_DIRECTIVE = re.compile(r"\[\[([a-z_]+)(?::([^\]]*))?\]\]")


@dataclass(frozen=True, slots=True)
class Plan:
    input_tokens: int
    words: list[str]
    truncated: bool  # the reply hit max_tokens
    fail: int | None = None
    delay: float = 0.0
    pace: float = 0.0
    malformed: bool = False
    cut: int | None = None
    fail_times: tuple[str, int] | None = None
    retry_after: float | None = None
    down: tuple[str, str] | None = None  # (model, what)

    @property
    def deltas(self) -> list[str]:
        # Like real token streams: every delta after the first carries its leading space.
        return [w if i == 0 else " " + w for i, w in enumerate(self.words)]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def text_of(content: Any) -> str:
    """Text of a message `content`: a string, or a list of content blocks / parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def count_tokens(chars: int) -> int:
    return max(1, -(-chars // 4))


# Framing a byte-counting tokenizer adds: 3 tokens priming the reply, 4 around each message.
BYTES_FRAMING = 3
BYTES_FRAMING_PER_MESSAGE = 4


def count_bytes_tokens(texts: list[str]) -> int:
    return BYTES_FRAMING + sum(
        len(t.encode("utf-8", "surrogatepass")) + BYTES_FRAMING_PER_MESSAGE for t in texts
    )


def make_plan(prompt_texts: list[str], user_text: str, max_tokens: int | None) -> Plan:
    """`prompt_texts`: every text sent (the system prompt and each message's content)."""
    input_tokens = count_tokens(sum(len(t) for t in prompt_texts))
    n_words = DEFAULT_REPLY_WORDS
    options: dict[str, Any] = {}
    if "[[" in user_text:  # cheap guard: the regex only runs when a directive may be present
        for name, arg in _DIRECTIVE.findall(user_text):
            _apply(name, arg, options)
        if options.pop("tokenizer", None) == "bytes":
            input_tokens = count_bytes_tokens(prompt_texts)
        if "usage" in options:
            input_tokens, n_words = options.pop("usage")
    limit = n_words if max_tokens is None else max(0, min(n_words, max_tokens))
    start = input_tokens % len(_WORDS)
    words = [_WORDS[(start + i) % len(_WORDS)] for i in range(limit)]
    return Plan(input_tokens=input_tokens, words=words, truncated=limit < n_words, **options)


def _apply(name: str, arg: str, options: dict[str, Any]) -> None:
    try:
        if name == "usage":
            in_tokens, out_tokens = (int(v) for v in arg.split(","))
            options["usage"] = (max(0, in_tokens), max(0, out_tokens))
        elif name == "fail":
            status = int(arg)
            if 400 <= status <= 599:
                options["fail"] = status
        elif name in ("delay", "pace"):
            options[name] = max(0.0, float(arg))
        elif name == "malformed":
            options["malformed"] = True
        elif name == "cut":
            options["cut"] = max(0, int(arg))
        elif name == "fail_times":
            what, times = arg.split(":")
            if what in ("reset", "cut") or 400 <= int(what) <= 599:
                options["fail_times"] = (what, max(0, int(times)))
        elif name == "down":
            model, what = arg.rsplit(":", 1)
            if what in ("reset", "cut") or 400 <= int(what) <= 599:
                options["down"] = (model, what)
        elif name == "retry_after":
            options["retry_after"] = max(0.0, float(arg))
        elif name == "tokenizer" and arg == "bytes":
            options["tokenizer"] = arg
    except ValueError:
        pass  # a directive with a bad argument is ignored, like any other text
