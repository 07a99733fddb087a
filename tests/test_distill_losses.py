"""Top-k distillation losses against naive full-vocabulary references, values and gradients."""

import math

import pytest
import torch

from lmrefinery.distill.losses import (chunked_logsumexp, student_log_probs, teacher_distribution,
                                       topk_kl_loss)

B, T, V, K = 2, 5, 50, 4


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=generator, dtype=torch.float64) * 2
    teacher_logits = torch.randn(B, T, V, generator=generator, dtype=torch.float64) * 3
    teacher_logprobs_full = torch.log_softmax(teacher_logits, -1)
    top = teacher_logprobs_full.topk(K, dim=-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False
    labels = torch.randint(0, V, (B, T), generator=generator)
    tail = torch.log1p(-top.values.exp().sum(-1))
    return student, top.indices, top.values, mask, labels, tail


def _reference(student, ids, logprobs, mask, labels, *, transform, temperature, other_bucket, smoothing, hard,
               reduction):
    """Naive: full-vocabulary softmax of the student, teacher buckets built from probabilities directly."""
    losses = []
    full = torch.log_softmax(student, -1)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            p = logprobs[b, t].exp()
            buckets = torch.cat([p, (1 - p.sum()).unsqueeze(0)]) if other_bucket else p
            if transform == "linear":
                target = buckets / buckets.sum()
            elif transform == "prob_temperature":
                target = torch.exp(buckets / temperature) / torch.exp(buckets / temperature).sum()
            else:
                target = torch.softmax(torch.log(buckets) / temperature, -1)
            target = (1 - smoothing) * target + smoothing / len(target)
            q_full = full[b, t].exp()
            q = q_full[ids[b, t]]
            q = torch.cat([q, (1 - q.sum()).unsqueeze(0)]) if other_bucket else q / q.sum()
            kl = (target * (target.log() - q.log())).sum()
            loss = (1 - hard) * kl + hard * -full[b, t, labels[b, t]] if hard else kl
            losses.append(loss)
    total = torch.stack(losses).sum()
    return total / mask.sum() if reduction == "token_mean" else total / B


OPTIONS = [
    dict(transform="linear", temperature=1.0, other_bucket=False, smoothing=0.0, hard=0.0, reduction="token_mean"),
    dict(transform="prob_temperature", temperature=0.28, other_bucket=False, smoothing=0.0, hard=0.0,
         reduction="token_mean"),
    dict(transform="logit_temperature", temperature=2.0, other_bucket=False, smoothing=0.0, hard=0.0,
         reduction="sequence_sum"),
    dict(transform="linear", temperature=1.0, other_bucket=True, smoothing=0.0, hard=0.0, reduction="token_mean"),
    dict(transform="prob_temperature", temperature=0.5, other_bucket=True, smoothing=0.1, hard=0.0,
         reduction="sequence_sum"),
    dict(transform="linear", temperature=1.0, other_bucket=False, smoothing=0.2, hard=0.0, reduction="token_mean"),
    dict(transform="linear", temperature=1.0, other_bucket=False, smoothing=0.0, hard=0.3, reduction="token_mean"),
]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_loss_and_gradient_equal_naive_reference(option):
    student, ids, logprobs, mask, labels, tail = _inputs()
    ours_input = student.clone().requires_grad_(True)
    reference_input = student.clone().requires_grad_(True)
    ours = topk_kl_loss(ours_input, ids, logprobs, mask, teacher_transform=option["transform"],
                        temperature=option["temperature"], other_bucket=option["other_bucket"],
                        label_smoothing=option["smoothing"], reduction=option["reduction"], teacher_tail=tail,
                        labels=labels, hard_label_weight=option["hard"], chunk_size=16)
    reference = _reference(reference_input, ids, logprobs, mask, labels, **option)
    assert ours.item() == pytest.approx(reference.item(), abs=1e-5)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours_input.grad, reference_input.grad, atol=1e-5, rtol=0)


def test_restricted_log_softmax_equals_renormalised_full_softmax():
    student, ids, *_ = _inputs()
    flat, flat_ids = student.reshape(-1, V), ids.reshape(-1, K)
    restricted = student_log_probs(flat, flat_ids, other_bucket=False)
    full = torch.softmax(flat, -1).gather(-1, flat_ids)
    torch.testing.assert_close(restricted.exp(), full / full.sum(-1, keepdim=True), atol=1e-12, rtol=0)


def test_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    student, ids, _, mask, _, _ = _inputs()
    own = torch.log_softmax(student, -1).gather(-1, ids)  # the student's own full-vocab log-probs as the teacher
    assert float(topk_kl_loss(student, ids, own, mask)) == pytest.approx(0.0, abs=1e-10)
    assert float(topk_kl_loss(student, ids, own, mask, other_bucket=True)) == pytest.approx(0.0, abs=1e-10)
    assert float(topk_kl_loss(student + torch.randn_like(student), ids, own, mask)) > 1e-3


def test_probability_temperature_preserves_rank_and_respects_the_cap():
    _, _, logprobs, *_ = _inputs()
    for c in (0.1, 0.28, 0.5, 1.0):
        probs = teacher_distribution(logprobs, transform="prob_temperature", temperature=c)
        assert torch.equal(probs.argsort(-1, descending=True), logprobs.float().argsort(-1, descending=True))
        cap = math.exp(1 / c) / (math.exp(1 / c) + K - 1)
        assert float(probs.max()) <= cap + 1e-6
        assert float(probs.min()) >= 0 and float(probs[..., 0].min()) >= 1 / K - 1e-6
    extreme = teacher_distribution(torch.log(torch.tensor([[1.0 - 3e-9, 1e-9, 1e-9, 1e-9]])),
                                   transform="prob_temperature", temperature=0.28)
    assert float(extreme[0, 0]) == pytest.approx(math.exp(1 / 0.28) / (math.exp(1 / 0.28) + 3), rel=1e-5)


def test_chunked_logsumexp_matches_and_keeps_gradients():
    logits = torch.randn(7, 1000, dtype=torch.float64, requires_grad=True)
    chunked = chunked_logsumexp(logits, chunk_size=97)
    torch.testing.assert_close(chunked, torch.logsumexp(logits, -1), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(grad, torch.softmax(logits, -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_parameter_gradients_on_a_tiny_model_equal_the_reference(option):
    from tests.tiny import tiny_model

    _, ids, logprobs, mask, labels, tail = _inputs()
    model = tiny_model("llama", vocab_size=V).double()
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))

    def gradients(loss_fn):
        model.zero_grad()
        loss = loss_fn(model(input_ids=tokens).logits)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    ours = gradients(lambda logits: topk_kl_loss(
        logits, ids, logprobs, mask, teacher_transform=option["transform"], temperature=option["temperature"],
        other_bucket=option["other_bucket"], label_smoothing=option["smoothing"], reduction=option["reduction"],
        teacher_tail=tail, labels=labels, hard_label_weight=option["hard"], chunk_size=16))
    reference = gradients(lambda logits: _reference(logits, ids, logprobs, mask, labels, **option))
    assert ours[0] == pytest.approx(reference[0], abs=1e-5)
    for a, b in zip(ours[1], reference[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_online_kd_equals_the_full_vocabulary_kl_times_t_squared():
    from lmrefinery.distill.losses import online_kd_per_position

    generator = torch.Generator().manual_seed(4)
    student = (torch.randn(6, V, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(6, V, generator=generator, dtype=torch.float64) * 3
    for temperature in (1.0, 2.5):
        ours = online_kd_per_position(student, teacher, temperature)
        reference = []
        for s, t in zip(student, teacher):  # naive: probabilities, then Σ p (log p − log q), times T²
            p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
            reference.append((p * (p.log() - q.log())).sum() * temperature ** 2)
        reference = torch.stack(reference)
        torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=0)
        (ours_grad,) = torch.autograd.grad(ours.sum(), student)
        (reference_grad,) = torch.autograd.grad(reference.sum(), student)
        torch.testing.assert_close(ours_grad.double(), reference_grad, atol=1e-5, rtol=0)
    assert float(online_kd_per_position(teacher, teacher, 2.0).abs().max()) < 1e-6


def test_cache_rows_align_with_the_response_positions_of_a_batch():
    """topk_distillation_sums reads the cache rows in row-major order of the response mask; summed per example and
    divided by the token count it must equal the masked topk_kl_loss on the padded tensors."""
    from lmrefinery.train.losses import ResponseLogits
    from lmrefinery.distill.losses import topk_distillation_sums

    student, ids, logprobs, mask, labels, tail = _inputs()
    response = ResponseLogits(student[mask], labels[mask], mask)
    settings = dict(teacher_transform="prob_temperature", temperature=0.5, other_bucket=True, hard_label_weight=0.2)
    sums, counts, stats = topk_distillation_sums(response, ids[mask], logprobs[mask], tail[mask], **settings)
    assert counts.tolist() == mask.sum(1).tolist()
    full = torch.softmax(student[mask], -1)
    assert float(stats["student_topk_mass"]) == pytest.approx(float(full.gather(-1, ids[mask]).sum()), rel=1e-9)
    expected = topk_kl_loss(student, ids, logprobs, mask, teacher_tail=tail, labels=labels, **settings)
    assert float(sums.sum() / counts.sum()) == pytest.approx(float(expected), abs=1e-9)
    per_example = [topk_kl_loss(student[b:b + 1], ids[b:b + 1], logprobs[b:b + 1], mask[b:b + 1],
                                teacher_tail=tail[b:b + 1], labels=labels[b:b + 1], reduction="sequence_sum",
                                **settings) for b in range(B)]
    torch.testing.assert_close(sums, torch.stack(per_example), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="cached positions"):
        topk_distillation_sums(response, ids[mask][1:], logprobs[mask][1:], tail[mask][1:], **settings)
