"""A multi-turn conversation laid out as one training sequence: its text and the spans trained on.

Shared by `dlm.train.rows` (rendering with transformers' `apply_chat_template`) and
`dlm.plan.tokens` (rendering with jinja2), so the plan counts exactly the text training encodes.
Pure: the caller passes the renderer.

The text is the chat template's rendering of the whole conversation (system, then user / assistant
turns). Each assistant turn's span is what the template writes after that turn's generation prompt
(the answer and its end-of-turn token, trailing whitespace left out), the same cut a single-turn
row's completion gets; everything else (system, user turns, the template's own markers) is context.
The text ends where the last answer's span ends, with eos appended when the template did not write
it, as a single-turn row's completion gets it. Without a chat template the turns follow dlm's
question / answer layout, one after another, as `dlm chat` lays out a conversation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# (messages, add_generation_prompt) -> the template's text; raises when the template refuses them
Render = Callable[[list[dict[str, str]], bool], str]
Pairs = Sequence[tuple[str, str]]  # (question, answer), in order
CONTEXT_HINT = "split the conversation into one-exchange rows, or train a base whose chat template keeps earlier turns"


class TemplateMismatch(ValueError):
    """The template renders a conversation so far differently from the same turns inside the whole."""


@dataclass(frozen=True)
class Layout:
    text: str  # the whole sequence as training encodes it (a BOS the tokenizer adds itself left out)
    spans: tuple[tuple[int, int], ...]  # [start, end) of each assistant turn in `text`, in order

    @property
    def last_head(self) -> str:
        """The text before the last answer: the conversation so far, ending with the generation prompt."""
        return self.text[: self.spans[-1][0]]


def messages(pairs: Pairs, system: str | None) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system else []
    for question, answer in pairs:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return out


def layout(
    pairs: Pairs, system: str | None, render: Render | None, *, eos: str, bos_prefix: str, fallback: str
) -> Layout:
    """The conversation `pairs` (with `system`) as one sequence; `render` is None without a chat
    template, `fallback` is then the question layout (`{prompt}` in it). Raises TemplateMismatch when
    the template does not render earlier turns as a prefix of the whole."""
    if not pairs:
        raise ValueError("a conversation needs at least one exchange")
    if render is None:
        text, spans = "", []
        for k, (question, answer) in enumerate(pairs):
            text += ("\n\n" if k else "") + fallback.format(prompt=question)
            spans.append((len(text), len(text) + len(answer)))
            text += answer
    else:
        msgs = messages(pairs, system)
        try:
            text, spans = _spans(render, msgs)
        except TemplateMismatch:
            raise
        except Exception:
            if not system:
                raise
            # Some templates (Gemma's) refuse a system role: fold the system text into the first question.
            first = {"role": "user", "content": f"{system}\n\n{pairs[0][0]}"}
            text, spans = _spans(render, [first, *msgs[2:]])
        if bos_prefix and text.startswith(bos_prefix):  # the tokenizer adds BOS itself; once is enough
            text = text[len(bos_prefix) :]
            spans = [(a - len(bos_prefix), b - len(bos_prefix)) for a, b in spans]
    if eos and not text.endswith(eos):
        text += eos
        spans[-1] = (spans[-1][0], len(text))
    return Layout(text, tuple(spans))


def _spans(render: Render, msgs: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    full = render(msgs, False)
    first_user = 1 if msgs[0]["role"] == "system" else 0
    spans = []
    for user in range(first_user, len(msgs), 2):
        head = render(msgs[: user + 1], True)
        done = render(msgs[: user + 2], False)
        answer = done[len(head) :].rstrip() if done.startswith(head) else None
        if answer is None or not full.startswith(head + answer):
            turn = (user - first_user) // 2 + 1
            raise TemplateMismatch(
                f"the base's chat template renders the conversation up to turn {turn} differently from the "
                "same turns inside the whole conversation, so the turns cannot be trained as one sequence"
            )
        spans.append((len(head), len(head) + len(answer)))
    return full[: spans[-1][1]], spans
