"""Labels mask exactly the prompt tokens, checked token by token against the chat template's rendered text."""

import pytest

from lmrefinery.data.files import BadRecord
from lmrefinery.data.formats import Conversation, Message
from lmrefinery.data.tokenize import IGNORE_INDEX, ChatEncoder
from lmrefinery.errors import UserError
from tests.tiny import tiny_tokenizer


def _conversation(*turns):
    return Conversation(tuple(Message(role, content) for role, content in turns))


SINGLE = _conversation(("user", "What is two plus three?"), ("assistant", "Two plus three is five."))
MULTI = _conversation(("system", "Answer briefly."), ("user", "What is two plus three?"),
                      ("assistant", "Five."), ("user", "Name the capital of France."),
                      ("assistant", "Paris."))


def _expected_labels_from_text(tokenizer, conversation):
    """Independent reference: render the template to text, mark the characters of every assistant reply plus its
    <|im_end|>, and supervise exactly the tokens whose characters fall inside those spans."""
    text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in conversation.messages],
                                         tokenize=False)
    spans, cursor = [], 0
    for message in conversation.messages:
        header = f"<|im_start|>{message.role}\n"
        start = text.index(header, cursor) + len(header)
        end = start + len(message.content) + len("<|im_end|>")
        assert text[start:end] == message.content + "<|im_end|>"
        if message.role == "assistant":
            spans.append((start, end))
        cursor = end
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        inside = any(s <= start and end <= e for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return encoding["input_ids"], labels


@pytest.mark.parametrize("conversation", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_labels_match_template_token_by_token(tokenizer, conversation):
    encoded = ChatEncoder(tokenizer).encode(conversation, "test")
    expected_ids, expected_labels = _expected_labels_from_text(tokenizer, conversation)
    assert encoded.input_ids == expected_ids
    assert encoded.labels == expected_labels
    # every assistant turn is supervised and ends with EOS; nothing after EOS (the newline) is
    eos = tokenizer.eos_token_id
    supervised_eos = [i for i, label in enumerate(encoded.labels) if label == eos]
    assert len(supervised_eos) == sum(m.role == "assistant" for m in conversation.messages)
    for position in supervised_eos:
        assert encoded.labels[position + 1] == IGNORE_INDEX


def test_default_system_prompt_of_the_template_is_kept(tokenizer):
    encoded = ChatEncoder(tokenizer).encode(SINGLE, "test")
    assert "You are a tiny test model." in tokenizer.decode(encoded.input_ids)
    custom = ChatEncoder(tokenizer, system_prompt="Be terse.").encode(SINGLE, "test")
    assert "Be terse." in tokenizer.decode(custom.input_ids)
    assert "tiny test model" not in tokenizer.decode(custom.input_ids)


def test_a_batch_renders_each_conversation_as_alone_and_isolates_the_records_the_template_rejects():
    # A template that refuses system turns (as some do); the batch also holds a conversation opening with an assistant
    # turn, whose empty prompt apply_chat_template rejects. Both become BadRecords in their place; the others are
    # encoded exactly, each the same as the reference rendering of it alone.
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns here') }}"
                "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = tiny_tokenizer(template)
    assistant_first = _conversation(("assistant", "Hello."), ("user", "Hi."), ("assistant", "Bye."))
    two_turns = _conversation(*[(m.role, m.content) for m in MULTI.messages[1:]])
    items = [(SINGLE, "a.jsonl:1"), (MULTI, "a.jsonl:2"), (two_turns, "a.jsonl:3"), (assistant_first, "a.jsonl:4"),
             (SINGLE, "a.jsonl:5")]
    results = ChatEncoder(tokenizer).encode_many(items)
    assert [isinstance(r, BadRecord) for r in results] == [False, True, False, True, False]
    assert results[1].location == "a.jsonl:2" and "no system turns here" in results[1].problem
    assert results[3].location == "a.jsonl:4" and "rejects" in results[3].problem
    for index in (0, 2, 4):
        expected_ids, expected_labels = _expected_labels_from_text(tokenizer, items[index][0])
        assert (results[index].input_ids, results[index].labels) == (expected_ids, expected_labels)


def test_fallback_without_template_has_exact_boundaries():
    tokenizer = tiny_tokenizer(chat_template=None)
    encoded = ChatEncoder(tokenizer).encode(MULTI, "test")
    supervised = [t for t in encoded.labels if t != IGNORE_INDEX]
    eos = tokenizer.eos_token_id
    reply_ids = [tokenizer("Five.", add_special_tokens=False)["input_ids"] + [eos],
                 tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [eos]]
    assert supervised == reply_ids[0] + reply_ids[1]
    text = tokenizer.decode(encoded.input_ids)
    assert text.startswith("Answer briefly.\n\n### User:\nWhat is two plus three?\n\n### Assistant:\nFive.")


def test_template_that_rewrites_history_fails_loudly():
    # A template that renders earlier assistant turns differently from the last one breaks the prefix property.
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
                "[old]<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(UserError, match="prefix"):
        ChatEncoder(tiny_tokenizer(template)).encode(MULTI, "data.jsonl line 7")


def _captured_prompts(model, run):
    """The unpadded input ids of every row the model was called with while `run()` scored or generated."""
    seen = []

    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if ids.shape[1] > 1 and not seen_generation_step(kwargs):
            seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))

    def seen_generation_step(kwargs):  # generate's later steps feed one new token with the cache
        return kwargs.get("past_key_values") is not None and kwargs["past_key_values"].get_seq_length() > 0

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("template", ["chat", "fallback"])
@pytest.mark.parametrize("system_prompt", [None, "Be terse."])
def test_evaluations_score_the_prompt_training_conditions_on(template, system_prompt):
    """MCQ scoring and exact-match generation feed the model, token for token, the prefix that training puts before
    the reply's labels (same chat template or fallback format, same system prompt)."""
    from lmrefinery.data.mcq_items import mcq_conversation, parse_item
    from lmrefinery.data.formats import parse_record
    from lmrefinery.evaluation.exact_match import generate_answers
    from lmrefinery.evaluation.mcq import answer_logits
    from tests.tiny import QA, tiny_model

    tokenizer = tiny_tokenizer() if template == "chat" else tiny_tokenizer(chat_template=None)
    encoder = ChatEncoder(tokenizer, system_prompt)
    model = tiny_model("llama", vocab_size=len(tokenizer)).eval()

    def training_prompt(record):
        encoded = encoder.encode(parse_record(record, "messages", "test"), "test")
        first_label = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
        return encoded.input_ids[:first_label]

    items = [parse_item({"question": q, "options": [a, "no", "maybe"], "answer": 0}, "t") for q, a in QA[:3]]
    scored = _captured_prompts(model, lambda: list(answer_logits(model, encoder, items, 2, "fp32", "cpu")))
    assert scored == [training_prompt(mcq_conversation(item)) for item in items]

    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA[:3]]
    prompts = [{"messages": r["messages"][:1], "reference": r["messages"][1]["content"], "metadata": {}}
               for r in records]
    generated = _captured_prompts(model, lambda: generate_answers(model, encoder, prompts, 3, 2, "cpu"))
    assert generated == [training_prompt(r) for r in records]
    if system_prompt is not None:
        assert all("Be terse." in tokenizer.decode(ids) for ids in scored + generated)
