"""LISACallback inside a Hugging Face Trainer passes the same checks as LISA in `sft`."""

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from lmrefinery.data.formats import Conversation, Message
from lmrefinery.data.tokenize import ChatEncoder
from lmrefinery.lisa import LISACallback
from lmrefinery.models import find_decoder_layers
from tests.tiny import QA, tiny_model


class Probe(TrainerCallback):
    """Records, after every optimizer step (and after LISA's own callback), what the checks need."""

    def __init__(self, lisa_callback):
        self.lisa_callback = lisa_callback
        self.records = []

    def _record(self, model, step):
        lisa = self.lisa_callback.lisa
        blocks = find_decoder_layers(model)
        self.records.append({
            "step": step, "active": list(lisa.active), "state_bytes": lisa.optimizer_state_bytes(),
            "requires_grad": [all(p.requires_grad for p in b.parameters()) for b in blocks],
            "any_grad": [any(p.requires_grad for p in b.parameters()) for b in blocks],
            "blocks": [[p.detach().clone() for p in b.parameters()] for b in blocks]})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(model, state.global_step)


def _dataset(tokenizer):
    encoder = ChatEncoder(tokenizer)
    rows = []
    for question, answer in QA * 4:
        encoded = encoder.encode(Conversation((Message("user", question), Message("assistant", answer))), "t")
        rows.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    return rows


def _trainer(tmp_path, tokenizer, callbacks, steps, **extra):
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             logging_steps=100, disable_tqdm=True, seed=0, **extra)
    model = tiny_model("llama", layers=4, vocab_size=len(tokenizer))
    return Trainer(model=model, args=args, train_dataset=_dataset(tokenizer),
                   data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=callbacks)


def test_callback_invariants(tmp_path, tokenizer):
    lisa_callback = LISACallback(layers=2, interval=2, seed=0)
    probe = Probe(lisa_callback)
    trainer = _trainer(tmp_path, tokenizer, [lisa_callback, probe], steps=8, save_strategy="no")
    trainer.train()
    records = probe.records  # index 0: before training; index k: after optimizer step k (and any switch)
    periods = [(records[k], records[k + 2]) for k in range(0, 8, 2)]
    for start, end in periods:
        for index in range(4):
            active = index in start["active"]
            assert start["requires_grad"][index] == active and start["any_grad"][index] == active
            for before, after in zip(start["blocks"][index], end["blocks"][index]):
                assert torch.equal(before, after) != active, (start["step"], index)
    bytes_after_switch = [r["state_bytes"] for r in records[2::2]]
    assert len(set(bytes_after_switch)) == 1  # the same after 1 and after 4 switches
    assert [h["step"] for h in lisa_callback.history] == [0, 2, 4, 6, 8]


def test_callback_resume_restores_active_set_and_weights(tmp_path, tokenizer):
    common = dict(save_strategy="steps", save_steps=3, restore_callback_states_from_checkpoint=True)
    uninterrupted = _trainer(tmp_path / "a", tokenizer, [LISACallback(layers=1, interval=2, seed=5)], 6, **common)
    uninterrupted.train()
    expected = {k: v.clone() for k, v in uninterrupted.model.state_dict().items()}
    callbacks = uninterrupted.callback_handler.callbacks
    expected_active = next(c for c in callbacks if isinstance(c, LISACallback)).lisa.active

    first = _trainer(tmp_path / "b", tokenizer, [LISACallback(layers=1, interval=2, seed=5)], 6, **common)
    first.train()
    resumed = _trainer(tmp_path / "b", tokenizer, [LISACallback(layers=1, interval=2, seed=5)], 6, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "hf" / "checkpoint-3"))
    lisa_callbacks = [c for c in resumed.callback_handler.callbacks if isinstance(c, LISACallback)]
    assert len(lisa_callbacks) == 1 and lisa_callbacks[0].lisa.active == expected_active
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)
