"""Token ids and response-only labels, with an exact prompt/response boundary.

With a chat template, the conversation is rendered turn by turn: for each assistant turn, the prefix before it
(with `add_generation_prompt=True`) and the prefix through it. Each rendering's ids must be a prefix of the next and of
the whole conversation's ids; the tokens between "prompt" and "through the turn" are that turn's response. This uses
the template exactly as the model saw it in training (most templates lack the `{% generation %}` marker), and a
template that re-tokenises across a boundary fails loudly instead of drifting silently.

Supervised tokens of a response run up to and including the first EOS token of that turn; what the template puts after
it (a newline, say) stays in the input but is not learned. When a turn has no EOS, the whole turn is learned and, for
the final turn, EOS is appended.

Without a chat template, the documented fallback renders
    "{system}\n\n" + for each turn: "### User:\n{user}\n\n### Assistant:\n" then "{assistant}<eos>\n\n"
by tokenising each piece on its own and concatenating the ids, so the boundary is exact by construction.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

from lmrefinery.data.files import BadRecord
from lmrefinery.data.formats import Example, Message, PlainText
from lmrefinery.errors import UserError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not supervised; aligned with input_ids (the model shifts)


def _starts_with(sequence: list[int], prefix: list[int]) -> bool:
    return len(prefix) <= len(sequence) and sequence[: len(prefix)] == prefix


class ChatEncoder:
    """Turns parsed examples into `Encoded` ids/labels with one tokenizer, the same way in every command."""

    def __init__(self, tokenizer, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; set one (tokenizer.eos_token)")
        self.uses_template = bool(getattr(tokenizer, "chat_template", None))
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self._bos = [bos] if bos is not None and probe and probe[0] == bos else []

    @functools.cached_property
    def fingerprint(self) -> str:
        """Of the tokenizer (computed once): part of the key of cached tokenised pools."""
        return tokenizer_fingerprint(self.tokenizer)

    def encode(self, example: Example, location: str) -> Encoded:
        result = self.encode_many([(example, location)])[0]
        if isinstance(result, BadRecord):
            raise result
        return result

    def encode_many(self, items: list[tuple[Example, str]]) -> list[Encoded | BadRecord]:
        """`encode` for many examples at once: every text is rendered first — all conversations in two
        `apply_chat_template` calls, so its per-call set-up is paid once — and all are tokenised in one batched call of
        the (Rust, multi-threaded) fast tokenizer: the same ids as one call per text, several times the throughput.
        A record the template rejects comes back as its BadRecord, in its place; a template that is not prefix-stable
        is an error for the whole source."""
        plans: list[_Plan | Encoded | BadRecord | None] = []
        texts: list[str] = []
        plain_texts: list[int] = []  # indices in `texts` of plain-text examples (tokenised with special tokens)
        chats: list[tuple[int, tuple[Message, ...], str]] = []  # (place in `plans`, messages, location)
        for example, location in items:
            if isinstance(example, PlainText):
                plans.append(_Plan(location, None, [len(texts)]))
                plain_texts.append(len(texts))
                texts.append(example.text)
            elif not self.uses_template:
                plans.append(self._encode_fallback(self._with_system(example.messages)))
            else:
                chats.append((len(plans), self._with_system(example.messages), location))
                plans.append(None)
        for (place, _, _), plan in zip(chats, self._plan_templates(chats, texts)):
            plans[place] = plan
        token_lists = self._tokenize_texts(texts, plain_texts)
        results: list[Encoded | BadRecord] = []
        for plan in plans:
            if not isinstance(plan, _Plan):
                results.append(plan)
            elif plan.messages is None:
                ids = token_lists[plan.text_indices[0]] + [self.eos_id]
                results.append(Encoded(ids, list(ids)))
            else:
                results.append(self._assemble_template(plan, [token_lists[i] for i in plan.text_indices]))
        return results

    def _tokenize_texts(self, texts: list[str], with_special_tokens: list[int]) -> list[list[int]]:
        """Ids of every text; plain-text examples (`with_special_tokens`) get the tokenizer's BOS etc., rendered
        chat templates none (they carry their own — as `apply_chat_template` tokenises)."""
        marked = set(with_special_tokens)
        rendered = [i for i in range(len(texts)) if i not in marked]
        ids: list[list[int]] = [[] for _ in texts]
        for indices, special in ((rendered, False), (with_special_tokens, True)):
            if indices:
                # only the ids: the masks would be converted to Python lists too and thrown away
                encoded = self.tokenizer([texts[i] for i in indices], add_special_tokens=special,
                                         return_attention_mask=False, return_token_type_ids=False)["input_ids"]
                for index, token_ids in zip(indices, encoded):
                    ids[index] = list(token_ids)
        return ids

    def prompt_ids(self, messages) -> list[int]:
        """The ids a model reads before it replies to `messages` (the last turn is the user's): exactly the prefix
        that `encode` puts before that reply's labels in training. Every evaluation and the teacher pass prompt
        through here, so a model is always scored on the prompt it was trained on."""
        messages = self._with_system(tuple(m if isinstance(m, Message) else Message(m["role"], m["content"])
                                           for m in messages))
        if self.uses_template:
            return self._render(messages, generation_prompt=True)
        return self._encode_fallback(messages).input_ids

    def _with_system(self, messages: tuple[Message, ...]) -> tuple[Message, ...]:
        if self.system_prompt is not None and messages[0].role != "system":
            return (Message("system", self.system_prompt),) + messages
        return messages

    @staticmethod
    def _message_dicts(messages: tuple[Message, ...]) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in messages]

    def _render(self, messages: tuple[Message, ...], generation_prompt: bool) -> list[int]:
        return list(self.tokenizer.apply_chat_template(
            self._message_dicts(messages),
            tokenize=True, add_generation_prompt=generation_prompt, return_dict=False))

    def _render_texts(self, conversations: list[tuple[Message, ...]], generation_prompt: bool) -> list[str]:
        return self.tokenizer.apply_chat_template(
            [self._message_dicts(messages) for messages in conversations],
            tokenize=False, add_generation_prompt=generation_prompt)

    def _render_text(self, messages: tuple[Message, ...], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            self._message_dicts(messages),
            tokenize=False, add_generation_prompt=generation_prompt)

    def _render_each(self, requests: list[tuple[tuple[Message, ...], bool]]) -> list[str | Exception]:
        """The text of every (conversation, generation prompt?) request, or the exception the template raised for it.
        One batched call per flag; a conversation is rendered on its own when it is empty (an assistant turn with no
        prompt: `apply_chat_template` rejects it alone, not inside a batch) or when its batch failed, to find the
        culprits."""
        rendered: list[str | Exception] = [""] * len(requests)
        alone: list[int] = [i for i, (messages, _) in enumerate(requests) if not messages]
        for flag in (False, True):
            chosen = [i for i, (messages, generation_prompt) in enumerate(requests)
                      if messages and generation_prompt is flag]
            if not chosen:
                continue
            try:
                outputs = self._render_texts([requests[i][0] for i in chosen], flag)
            except Exception:  # jinja raises for roles a template rejects (e.g. a system turn)
                alone.extend(chosen)
                continue
            for i, output in zip(chosen, outputs):
                rendered[i] = output
        for i in alone:
            try:
                rendered[i] = self._render_text(*requests[i])
            except Exception as exc:
                rendered[i] = exc
        return rendered

    def _plan_templates(self, chats: list[tuple[int, tuple[Message, ...], str]],
                        texts: list[str]) -> list["_Plan | BadRecord"]:
        """For each conversation: render the whole of it and, per assistant turn, the prompt before the turn and the
        text through it; the texts go to `texts`, and one `_Plan` (or BadRecord) per conversation comes back. The last turn's
        "through" is the whole conversation: neither rendered nor tokenised twice (its index is the whole's)."""
        requests: list[tuple[tuple[Message, ...], bool]] = []
        layouts: list[list[int]] = []  # per conversation: its requests, in `_assemble_template`'s order
        for _, messages, _ in chats:
            layout = [len(requests)]
            requests.append((messages, False))
            last = len(messages) - 1
            for index, message in enumerate(messages):
                if message.role != "assistant":
                    continue
                layout.append(len(requests))
                requests.append((messages[:index], True))
                if index == last:
                    layout.append(layout[0])
                else:
                    layout.append(len(requests))
                    requests.append((messages[: index + 1], False))
            layouts.append(layout)
        rendered = self._render_each(requests)
        plans: list[_Plan | BadRecord] = []
        for (_, messages, location), layout in zip(chats, layouts):
            failure = next((rendered[i] for i in layout if isinstance(rendered[i], Exception)), None)
            if failure is not None:
                plans.append(BadRecord(location, f"the chat template rejects this conversation ({failure})"))
                continue
            text_index: dict[int, int] = {}
            for request in layout:
                if request not in text_index:
                    text_index[request] = len(texts)
                    texts.append(rendered[request])
            plans.append(_Plan(location, messages, [text_index[request] for request in layout]))
        return plans

    def _assemble_template(self, plan: "_Plan", token_lists: list[list[int]]) -> Encoded:
        messages, full = plan.messages, token_lists[0]
        turns = iter(token_lists[1:])
        labels = [IGNORE_INDEX] * len(full)
        previous_end = 0
        prompt: list[int] = []
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt, through = next(turns), next(turns)
            if not (_starts_with(prompt, full[:previous_end]) and _starts_with(through, prompt)
                    and _starts_with(full, through)):
                raise UserError(
                    f"{plan.location}: the tokenizer's chat template does not render this conversation prefix-stably "
                    f"(turn {index}: the ids of the prompt are not a prefix of the ids through the reply); response "
                    f"labels would drift. Use a template without history-dependent rendering, or remove "
                    f"tokenizer.chat_template to use the documented fallback format")
            response = full[len(prompt): len(through)]
            if self.eos_id in response:
                response = response[: response.index(self.eos_id) + 1]
            labels[len(prompt): len(prompt) + len(response)] = response
            previous_end = len(through)
        if messages[-1].role == "assistant" and self.eos_id not in full[len(prompt):]:
            full = full + [self.eos_id]
            labels = labels + [self.eos_id]
        return Encoded(full, labels)

    def _encode_fallback(self, messages: tuple[Message, ...]) -> Encoded:
        def piece(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        ids, labels = list(self._bos), [IGNORE_INDEX] * len(self._bos)
        for message in messages:
            if message.role == "system":
                chunk, learn = piece(f"{message.content}\n\n"), False
            elif message.role == "user":
                chunk, learn = piece(f"### User:\n{message.content}\n\n### Assistant:\n"), False
            else:
                reply = piece(message.content) + [self.eos_id]
                ids += reply
                labels += reply
                chunk, learn = piece("\n\n"), False
            ids += chunk
            labels += chunk if learn else [IGNORE_INDEX] * len(chunk)
        return Encoded(ids, labels)


@dataclass
class _Plan:
    """One example waiting for its texts' ids: `messages` None for plain text."""
    location: str
    messages: tuple[Message, ...] | None
    text_indices: list[int]


def supervised_count(labels: list[int]) -> int:
    """Tokens that contribute to the loss: labels at positions 1.. (position 0 has no preceding token)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever tokenised data could differ: vocabulary, special tokens, chat template."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return digest.hexdigest()
