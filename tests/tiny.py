"""Tiny random models and a tiny tokenizer, built in memory: tests never download anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is two plus three? Two plus three is five.",
    "Name the capital of France. The capital of France is Paris.",
    "Translate hello into French: bonjour. Summarise the text below in one sentence.",
    "The quick brown fox jumps over the lazy dog 0123456789 + - * / = ? ! , . : ;",
    "system user assistant You are a tiny test model. answer question option A B C D",
]


def tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    # The fixtures' models are built with this vocabulary size; a tokenizer change must not silently outgrow it.
    assert len(tokenizer) == 320 and tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    return tokenizer


FAMILIES = ("llama", "qwen2", "gemma2", "mistral", "gpt2", "phi3")


def tiny_config(family: str, vocab_size: int = 320, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=64)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "phi3":
        return tf.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=layers, n_head=4, n_positions=512,
                             bos_token_id=2, eos_token_id=2)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2, vocab_size: int = 320):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, layers), dtype=torch.float32)


def save_tiny_model(directory: Path, family: str = "llama", seed: int = 0, layers: int = 2) -> Path:
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, seed, layers, vocab_size=len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


QA = [("What is two plus three?", "Two plus three is five."),
      ("Name the capital of France.", "The capital of France is Paris."),
      ("Translate hello into French.", "bonjour"),
      ("What is one plus one?", "Two."),
      ("Summarise: the quick brown fox jumps over the lazy dog.", "A fox jumps over a dog."),
      ("Which option, A or B?", "B")]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def messages_records(offset: int = 0, count: int = 6) -> list[dict]:
    items = [QA[(offset + i) % len(QA)] for i in range(count)]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in items]
