"""LoRA (peft) for sft, distill and ScaleBiO: adapters peft loads, merged weights equal peft's own merge, and
LoRA-ScaleBiO's three gradients equal autograd of the bilevel penalty objective over the adapter parameters; resume,
micro-batching and two processes change nothing; the corrupted-sources ordering holds with adapters too."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmrefinery.config import LoRAConfig
from lmrefinery.models.lora import AdapterView, add_lora, lora_parameters
from lmrefinery.scalebio import ScaleBiO
from tests.helpers import final_weights, resumed_after_kill, run_cli, sft_config, write_yaml
from tests.test_reweight import (_reweight_config, assert_ordered_by_corruption,
                                 same_weights_on_one_and_two_processes)
from tests.tiny import save_tiny_model, tiny_model

peft = pytest.importorskip("peft")

LORA = {"enabled": True, "r": 4, "alpha": 8}


def _randomise(model, adapter: str, seed: int) -> None:
    """Give an adapter non-zero B (peft starts B at zero, where every adapter is the base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in lora_parameters(model, adapter):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _batches(seed: int, count: int, size: int = 4, length: int = 12, sources: int = 3):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(5, 300, (size, length), generator=generator)
        batches.append({"input_ids": ids, "source_ids": torch.arange(size) % sources})  # every source present
    return batches


def _example_losses(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return losses.mean(dim=1)


def _core(shared, lr=0.0, **options):
    upper, lower = AdapterView(shared, "upper"), AdapterView(shared, "lower")
    return ScaleBiO(upper, 3, lambda m, b: (_example_losses(m, b), b["source_ids"]),
                    lambda m, b: _example_losses(m, b).mean(), lower_model=lower, alpha=7.0, lr_lower=lr,
                    lr_upper=lr, lr_weights=lr, weight_decay=0.0, **options)


def _shared_model(seed=0):
    torch.manual_seed(seed)
    shared = add_lora(tiny_model("llama", seed=seed), LoRAConfig(**LORA), adapters=("upper", "lower"))
    _randomise(shared, "upper", 1)
    _randomise(shared, "lower", 2)
    return shared


def test_adapters_start_equal_and_only_adapters_train():
    shared = add_lora(tiny_model("llama"), LoRAConfig(**LORA), adapters=("upper", "lower"))
    upper, lower = dict(lora_parameters(shared, "upper")), dict(lora_parameters(shared, "lower"))
    assert len(upper) == len(lower) > 0
    for name, parameter in upper.items():
        assert torch.equal(parameter, lower[name.replace(".upper.", ".lower.")])  # u = w at step 0
    trainable = {name for name, p in shared.named_parameters() if p.requires_grad}
    assert trainable == set(upper) | set(lower)


def test_lora_scalebio_gradients_equal_autograd_of_the_penalty_objective():
    """g_λ = ∇_λ α(L2_λ(w) − L2_λ(u)), g_u = ∇_u L2_λ(u), g_w = ∇_w [L1(w) + α L2_λ(w)] — all by plain autograd
    through the shared PeftModel with each adapter set active by peft, against the core's step (learning rates 0, so
    the step leaves the point unchanged and the gradients stay readable)."""
    shared = _shared_model()
    core = _core(shared)
    with torch.no_grad():
        core.logits.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    train, val = _batches(0, 1)[0], _batches(1, 1)[0]
    core.step(train, val)
    ours = {"weights": core.logits.grad.clone(),
            **{name: {n: p.grad.clone() for n, p in lora_parameters(shared, name)} for name in ("lower", "upper")}}

    logits = core.logits.detach().clone().requires_grad_(True)
    counts = torch.bincount(train["source_ids"], minlength=3).double()

    def penalty_l2(adapter):
        shared.set_adapter(adapter)
        for _, parameter in lora_parameters(shared):
            parameter.requires_grad_(True)
        weights = torch.softmax(logits, 0)[train["source_ids"]] / counts[train["source_ids"]]
        return (weights * _example_losses(shared, train).double()).sum()

    shared.zero_grad(set_to_none=True)
    objective_u = penalty_l2("lower")
    (grad_weights_u,) = torch.autograd.grad(objective_u, logits, retain_graph=True)
    objective_u.backward()
    objective_w = penalty_l2("upper")
    (grad_weights_w,) = torch.autograd.grad(objective_w, logits, retain_graph=True)
    shared.set_adapter("upper")
    for _, parameter in lora_parameters(shared):
        parameter.requires_grad_(True)
    (_example_losses(shared, val).mean().double() + 7.0 * objective_w).backward()
    torch.testing.assert_close(ours["weights"], 7.0 * (grad_weights_w - grad_weights_u), atol=1e-10, rtol=1e-6)
    for name in ("lower", "upper"):
        reference = dict(lora_parameters(shared, name))
        assert ours[name].keys() == reference.keys()
        for key, value in ours[name].items():
            torch.testing.assert_close(value, reference[key].grad, atol=1e-7, rtol=1e-5)
    assert all(p.grad is None for n, p in shared.named_parameters() if ".lora_" not in n)  # the base stays frozen


def test_lora_scalebio_step_does_not_depend_on_the_micro_batch_split():
    results = []
    for split in (1, 4):
        shared = _shared_model()
        core = _core(shared, lr=1e-1, optimizer="sgd")  # SGD: Adam would magnify float rounding of near-zero grads
        for step in range(2):
            train, val = _batches(10 + step, 1, size=8)[0], _batches(20 + step, 1, size=8)[0]
            micro = [{key: value[i::split] for key, value in train.items()} for i in range(split)]
            core.step(micro, [{key: value[i::split] for key, value in val.items()} for i in range(split)])
        results.append((core.weights.clone(), {n: p.detach().clone() for n, p in lora_parameters(shared)}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-7, rtol=0)
    for key, value in results[0][1].items():
        torch.testing.assert_close(value, results[1][1][key], atol=1e-6, rtol=1e-5)


def _lora_reweight_config(tmp_path, model_dir, seed=0, **train):
    config = _reweight_config(tmp_path, model_dir, seed, **train)
    config["lora"] = dict(LORA)
    config["scalebio"] |= {"lr_lower": 1e-2, "lr_upper": 1e-2}
    return config


@pytest.mark.parametrize("seed", [0, 1])
def test_lora_scalebio_orders_the_corrupted_sources(tmp_path, seed):
    model_dir = save_tiny_model(tmp_path / "model", "llama", seed=seed)
    assert_ordered_by_corruption(tmp_path, _lora_reweight_config(tmp_path, model_dir, seed))


def test_lora_reweight_resume_is_bit_equal_and_checkpoints_hold_adapters_only(tmp_path, tiny_model_dir):
    config = _lora_reweight_config(tmp_path, tiny_model_dir, steps=6, checkpoint_every=3, keep_last=5)
    run, reference = resumed_after_kill(tmp_path, "reweight", config, 3, 6, ("weights.json", "weights.csv"))
    assert json.loads((run / "weights.json").read_text())["weights"] == \
        json.loads((reference / "weights.json").read_text())["weights"]
    final, expected = final_weights(run, 6, "adapters"), final_weights(reference, 6, "adapters")
    assert final.keys() == expected.keys() and all(".lora_" in key for key in final)
    for key in final:
        assert torch.equal(final[key], expected[key]), key


@pytest.mark.slow
def test_lora_reweight_two_processes_give_the_same_weights(tmp_path, tiny_model_dir):
    single, double = same_weights_on_one_and_two_processes(
        tmp_path, _lora_reweight_config(tmp_path, tiny_model_dir, steps=4, micro_batch_size=4))
    a, b = final_weights(single, 4, "adapters"), final_weights(double, 4, "adapters")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_sft_with_lora_saves_an_adapter_peft_loads_and_a_merged_model_equal_to_peft_merge(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tree = sft_config(tmp_path, tiny_model_dir, steps=3, lr=1e-2)
    tree["lora"] = dict(LORA, merge=True)
    assert run_cli("sft", "--config", write_yaml(tmp_path / "c.yaml", tree)) == 0
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["model"] == str(run / "model")
    adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    trained = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(value.abs().max() > 0 for key, value in trained.items() if "lora_B" in key)  # the adapter moved
    reference = adapter.merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    assert merged.keys() == reference.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key], atol=1e-6, rtol=0)
    # the checkpoint holds the adapter only; the base model is where it was loaded from
    assert all(".lora_" in key for key in final_weights(run, 3))


def test_a_lora_adapter_directory_loads_as_base_plus_adapter_everywhere(tmp_path, tiny_model_dir):
    tree = sft_config(tmp_path, tiny_model_dir, steps=3, lr=1e-2)
    tree["lora"] = dict(LORA)
    assert run_cli("sft", "--config", write_yaml(tmp_path / "c.yaml", tree)) == 0
    adapter_dir = tmp_path / "run" / "adapter"
    assert not (tmp_path / "run" / "model").exists()
    scores = {}
    for name, location in (("adapter", adapter_dir), ("base", tiny_model_dir)):
        out = tmp_path / f"eval-{name}"
        config = write_yaml(tmp_path / f"eval-{name}.yaml", {
            "task": "loss", "output_dir": str(out), "model": {"name_or_path": str(location)},
            "data": {"sources": tree["data"]["sources"][:1], "max_length": 96}})
        assert run_cli("evaluate", "--config", config) == 0
        scores[name] = json.loads((out / "eval.json").read_text())["overall"]["loss"]
    assert scores["adapter"] < scores["base"]  # the trained adapter is applied, on the data it was trained on


def test_lisa_and_lora_together_are_refused(tmp_path, tiny_model_dir, capsys):
    tree = sft_config(tmp_path, tiny_model_dir, steps=1)
    tree["lora"], tree["lisa"] = dict(LORA), {"enabled": True}
    assert run_cli("sft", "--config", write_yaml(tmp_path / "c.yaml", tree)) == 2
    assert "choose one" in capsys.readouterr().err


def test_distill_with_lora_trains_only_adapters_of_the_student_and_saves_them_in_peft_format(tmp_path, tiny_model_dir):
    """keep_every 1 with `linear` gives zero loss at step 0 (the student is the teacher); the adapter then learns
    from a prob_temperature target, while every base weight stays the teacher's."""
    from transformers import AutoModelForCausalLM

    from lmrefinery.train.run_dir import read_metrics
    from tests.first_helpers import make_cache

    cache = make_cache(tmp_path, tiny_model_dir)
    config = {"output_dir": str(tmp_path / "student"), "cache": str(cache), "lora": dict(LORA, merge=True),
              "student": {"init": "keep-layers", "keep_every": 1},
              "loss": {"teacher_transform": "prob_temperature", "temperature": 0.5},
              "train": {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 0}}
    assert run_cli("distill", "--config", write_yaml(tmp_path / "d.yaml", config)) == 0
    losses = [m["loss"] for m in read_metrics(tmp_path / "student" / "metrics.jsonl") if "loss" in m]
    assert losses[-1] < losses[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "student" / "adapter")
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in adapted.state_dict().items() if ".lora_" not in k}
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for key, value in teacher.items():
        assert torch.equal(frozen[key], value), key  # the student's base is the teacher, untouched
    reference = adapted.merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "student" / "model").state_dict()
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key], atol=1e-6, rtol=0)
