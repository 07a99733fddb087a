"""Top-k distillation losses (docs/methods/first.md §5), computed without a full-vocabulary fp32 tensor.

At each supervised position the teacher contributes k token ids with their full-vocabulary log-probabilities (and the
tail log-mass log(1 − Σ p)). The teacher distribution over the k buckets (k + 1 with `other_bucket`) is

    linear             P_T(i) = p_i / Σ_j p_j                      (renormalised top-k)
    prob_temperature   P_T(i) = exp(p_i / c) / Σ_j exp(p_j / c)     (FIRST's trustworthy maximisation, c = temperature)
    logit_temperature  P_T(i) = softmax(log p_i / T)                (the standard temperature on the stored log-probs)

then optionally smoothed in probability space, (1 − ε)·P_T + ε / buckets. The student side is the log-softmax over its
k logits gathered at the teacher's ids (equal to renormalising its full softmax over those ids); with `other_bucket`
the student's k + 1 buckets are its full-vocabulary log-probs of the k ids plus the log of the remaining mass, with the
full-vocabulary log-sum-exp computed in vocabulary chunks. Loss per position: KL(P_T ‖ P_S), forward KL.

Online KD (the full-vocabulary baseline) is here too, and so is the alignment of a batch with its cache rows: the
cache stores one row per response position in row-major order, exactly the order of `ResponseLogits`.
"""

from __future__ import annotations

import torch

from lmrefinery.train.losses import ResponseLogits, example_sums

TRANSFORMS = ("linear", "prob_temperature", "logit_temperature")


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class _ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp over the last dimension, one vocabulary chunk at a time in ≥ fp32.

    The backward pass writes softmax(chunk) · grad straight into one gradient tensor of the input's dtype, so neither
    direction ever holds an fp32 copy of the whole [..., vocabulary] tensor.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
        parts = [torch.logsumexp(_at_least_fp32(logits[..., start: start + chunk_size]), dim=-1)
                 for start in range(0, logits.shape[-1], chunk_size)]
        lse = torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)
        ctx.save_for_backward(logits, lse)
        ctx.chunk_size = chunk_size
        return lse

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[-1], ctx.chunk_size):
            piece = _at_least_fp32(logits[..., start: start + ctx.chunk_size])
            grad[..., start: start + ctx.chunk_size] = torch.exp(piece - lse.unsqueeze(-1)) * grad_output.unsqueeze(-1)
        return grad, None


def chunked_logsumexp(logits: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """logsumexp over the last dimension (at least fp32), computed and differentiated one vocabulary chunk at a time."""
    return _ChunkedLogSumExp.apply(logits, chunk_size)


def teacher_distribution(teacher_logprobs: torch.Tensor, *, transform: str = "linear", temperature: float = 1.0,
                         other_bucket: bool = False, tail_logmass: torch.Tensor | None = None,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Teacher probabilities over the k (or k + 1) buckets, per position: [..., k(+1)], fp32."""
    if transform not in TRANSFORMS:
        raise ValueError(f"teacher_transform must be one of {TRANSFORMS}, got {transform!r}")
    logp = _at_least_fp32(teacher_logprobs)
    if other_bucket:
        tail = _at_least_fp32(tail_logmass) if tail_logmass is not None else log1mexp(torch.logsumexp(logp, dim=-1))
        logp = torch.cat([logp, tail.unsqueeze(-1)], dim=-1)
    if transform == "linear":
        probs = torch.softmax(logp, dim=-1)
    elif transform == "prob_temperature":
        probs = torch.softmax(logp.exp() / temperature, dim=-1)
    else:
        probs = torch.softmax(logp / temperature, dim=-1)
    if label_smoothing:
        probs = (1.0 - label_smoothing) * probs + label_smoothing / probs.shape[-1]
    return probs


def student_log_probs(student_logits: torch.Tensor, teacher_ids: torch.Tensor, other_bucket: bool,
                      full_logsumexp: torch.Tensor | None = None, chunk_size: int = 8192) -> torch.Tensor:
    """The student's log-probabilities over the teacher's buckets: [N, k] or [N, k + 1] (fp32)."""
    gathered = _at_least_fp32(student_logits.gather(-1, teacher_ids.long()))
    if not other_bucket:
        return torch.log_softmax(gathered, dim=-1)
    lse = full_logsumexp if full_logsumexp is not None else chunked_logsumexp(student_logits, chunk_size)
    inside = gathered - lse.unsqueeze(-1)
    other = log1mexp(torch.logsumexp(inside, dim=-1))
    return torch.cat([inside, other.unsqueeze(-1)], dim=-1)


def topk_kl_per_position(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                         *, teacher_transform: str = "linear", temperature: float = 1.0, other_bucket: bool = False,
                         label_smoothing: float = 0.0, teacher_tail: torch.Tensor | None = None,
                         labels: torch.Tensor | None = None, hard_label_weight: float = 0.0,
                         chunk_size: int = 8192) -> torch.Tensor:
    """Loss at each selected position. student_logits [N, V] (any float dtype), teacher_ids / teacher_logprobs
    [N, k], teacher_tail [N], labels [N] (the true next tokens, for the hard-label mix)."""
    target = teacher_distribution(teacher_logprobs, transform=teacher_transform, temperature=temperature,
                                  other_bucket=other_bucket, tail_logmass=teacher_tail,
                                  label_smoothing=label_smoothing)
    need_lse = other_bucket or hard_label_weight > 0
    lse = chunked_logsumexp(student_logits, chunk_size) if need_lse else None
    log_q = student_log_probs(student_logits, teacher_ids, other_bucket, lse, chunk_size)
    kl = (torch.xlogy(target, target) - target * log_q).sum(dim=-1)
    if hard_label_weight > 0:
        if labels is None:
            raise ValueError("hard_label_weight > 0 needs labels")
        cross_entropy = lse - _at_least_fp32(student_logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1))
        return (1.0 - hard_label_weight) * kl + hard_label_weight * cross_entropy
    return kl


def topk_kl_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                 mask: torch.Tensor, *, teacher_transform: str = "linear", temperature: float = 1.0,
                 other_bucket: bool = False, label_smoothing: float = 0.0, reduction: str = "token_mean",
                 teacher_tail: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 hard_label_weight: float = 0.0, chunk_size: int = 8192) -> torch.Tensor:
    """Scalar top-k KD loss over a batch.

    student_logits [B, T, V]; teacher_ids, teacher_logprobs [B, T, k]; mask [B, T] marks the positions with a
    teacher distribution (those predicting a response token); teacher_tail [B, T]; labels [B, T] next-token ids.
    reduction: "token_mean" (mean over masked positions) or "sequence_sum" (sum over positions / batch size, the
    authors' choice, whose gradient scale grows with response length).
    """
    if reduction not in ("token_mean", "sequence_sum"):
        raise ValueError(f"reduction must be 'token_mean' or 'sequence_sum', got {reduction!r}")
    mask = mask.bool()
    per_position = topk_kl_per_position(
        student_logits[mask], teacher_ids[mask], teacher_logprobs[mask], teacher_transform=teacher_transform,
        temperature=temperature, other_bucket=other_bucket, label_smoothing=label_smoothing,
        teacher_tail=teacher_tail[mask] if teacher_tail is not None else None,
        labels=labels[mask] if labels is not None else None, hard_label_weight=hard_label_weight,
        chunk_size=chunk_size)
    sums = example_sums(per_position, mask)
    if reduction == "token_mean":
        return sums.sum() / mask.sum().clamp(min=1)
    return sums.sum() / student_logits.shape[0]


def student_topk_mass(student_logits: torch.Tensor, teacher_ids: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """The student's full-vocabulary probability mass on the teacher's top-k ids, per position ([N, V] → [N]).

    The renormalised top-k loss constrains only ratios among those ids: its gradient is zero outside them and sums to
    zero over them, so it never raises this mass. A student that starts with little mass there (a keep-layers init)
    can reach zero loss while its top-1 stays a token the teacher never ranked; this is the number that shows it.
    """
    with torch.no_grad():
        inside = torch.logsumexp(_at_least_fp32(student_logits.gather(-1, teacher_ids.long())), dim=-1)
        return torch.exp(inside - chunked_logsumexp(student_logits, chunk_size))


def topk_distillation_sums(response: ResponseLogits, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                           teacher_tail: torch.Tensor, **settings) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per example of a batch: the sum of top-k losses over its response positions, how many there are, and the sum
    of the student's mass on the teacher's top-k ids (`student_topk_mass`, a diagnostic).

    The teacher rows [P, k] / [P] are the batch's cache rows concatenated example by example — the same row-major
    order as `response.logits`, so row i of each is the same position. `settings`: the keyword arguments of
    `topk_kl_per_position` (transform, temperature, other bucket, smoothing, hard-label weight).
    """
    if teacher_ids.shape[0] != response.logits.shape[0]:
        raise ValueError(f"{teacher_ids.shape[0]} cached positions for {response.logits.shape[0]} response "
                         f"positions: the cache was not made from these examples")
    device = response.logits.device
    teacher_ids = teacher_ids.to(device)
    per_position = topk_kl_per_position(response.logits, teacher_ids, teacher_logprobs.to(device),
                                        teacher_tail=teacher_tail.to(device), labels=response.targets, **settings)
    mass = student_topk_mass(response.logits, teacher_ids)
    return response.example_sums(per_position), response.counts(), {"student_topk_mass": mass.sum()}


def online_kd_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary KD: KL(softmax(teacher / T) ‖ softmax(student / T)) · T² at each position ([N, V] → [N])."""
    target = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (target.exp() * (target - student)).sum(-1) * temperature ** 2


def online_kd_sums(response: ResponseLogits, teacher_logits: torch.Tensor,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: online-KD loss summed over its response positions (teacher logits [P, V], same order)."""
    return response.example_sums(online_kd_per_position(response.logits, teacher_logits, temperature)), \
        response.counts()
