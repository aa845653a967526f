"""The fused, chunked logit loss equals plain autograd on full logits, and its memory is flat."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wattkd.distill.fused import TeacherHidden, fused_logit_loss
from wattkd.distill.losses import DenseTeacher, TopKTeacher
from wattkd.distill.registry import get_loss

N, H, HT, V = 37, 12, 10, 50


def _terms(*items):
    return [(get_loss(name), w, params) for name, w, params in items]


KD_TERMS = _terms(("forward_kl", 1.0, {"temperature": 2.0}), ("ce", 0.5, {}),
                  ("jsd", 0.7, {"beta": 0.3}), ("reverse_kl", 0.2, {}), ("tv", 0.1, {}))


def _inputs(seed=0, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_(True) if bias else None
    th = torch.randn(N, HT, generator=g, dtype=dtype)
    tw = torch.randn(V, HT, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    mask = torch.rand(N, generator=g) > 0.3
    return h, w, b, th, tw, labels, mask


def _teacher(kind, th, tw, softcap=None):
    logits = th @ tw.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if kind == "hidden":
        return TeacherHidden(th, tw, softcap=softcap), DenseTeacher(logits)
    if kind == "dense":
        return DenseTeacher(logits), DenseTeacher(logits)
    logp = F.log_softmax(logits, -1)
    lp, ids = logp.topk(8, -1)
    topk = TopKTeacher(ids, lp, torch.logsumexp(logp.scatter(1, ids, -math.inf), -1))
    return topk, topk


def _reference(h, w, b, teacher, labels, mask, terms, softcap=None):
    """Plain autograd on the full [N,V] logits, reduction written out."""
    z = F.linear(h, w, b)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    m = mask.float()
    loss, stats = 0.0, {}
    for spec, weight, params in terms:
        per = spec.fn(z, teacher, labels, **params)
        counted = m * (labels != -100) if spec.needs_labels else m
        mean = (per * counted).sum() / counted.sum()
        loss = loss + weight * mean
        stats[spec.name] = mean.item()
    return loss, stats


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("kind", ["hidden", "dense", "topk"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_fused_equals_unchunked_loss_and_grads(kind, chunk):
    h, w, b, th, tw, labels, mask = _inputs()
    source, ref_teacher = _teacher(kind, th, tw)
    loss, stats = fused_logit_loss(h, (w, b), source, labels, mask, KD_TERMS, chunk_tokens=chunk)
    ref, ref_stats = _reference(h, w, b, ref_teacher, labels, mask, KD_TERMS)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert stats.keys() == ref_stats.keys()
    for key in stats:
        assert stats[key] == pytest.approx(ref_stats[key], rel=1e-5, abs=1e-6)
    for got, want in zip(_grads(loss, (h, w, b)), _grads(ref, (h, w, b))):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_softcaps_and_nn_linear_head():
    h, _, _, th, tw, labels, mask = _inputs(seed=1)
    head = nn.Linear(H, V)
    source, ref_teacher = _teacher("hidden", th * 20, tw, softcap=5.0)
    loss, _ = fused_logit_loss(h, head, source, labels, mask, KD_TERMS, chunk_tokens=5,
                               s_softcap=3.0)
    ref, _ = _reference(h, head.weight, head.bias, ref_teacher, labels, mask, KD_TERMS,
                        softcap=3.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    params = (h, head.weight, head.bias)
    for got, want in zip(_grads(loss, params), _grads(ref, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_masked_rows_get_no_gradient_and_garbage_there_is_ignored():
    h, w, b, th, tw, labels, mask = _inputs(seed=2)
    logits = th @ tw.T
    logits[~mask] = math.nan  # e.g. padding rows of a teacher cache
    loss, stats = fused_logit_loss(h, (w, b), DenseTeacher(logits), labels, mask, KD_TERMS,
                                   chunk_tokens=8)
    (gh,) = torch.autograd.grad(loss, h)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
    assert (gh[~mask] == 0).all() and (gh[mask].abs().sum(-1) > 0).all()


def test_all_masked_is_zero_without_nan():
    h, w, b, th, tw, labels, _ = _inputs(seed=3)
    mask = torch.zeros(N)
    loss, stats = fused_logit_loss(h, (w, b), TeacherHidden(th, tw), labels, mask, KD_TERMS)
    gh, gw, gb = torch.autograd.grad(loss, (h, w, b))
    assert loss.item() == 0.0 and set(stats.values()) == {0.0}
    assert all((g == 0).all() for g in (gh, gw, gb))
    # and only unlabelled tokens: ce is 0, the KD terms still count
    loss, stats = fused_logit_loss(h, (w, b), TeacherHidden(th, tw), torch.full((N,), -100),
                                   None, KD_TERMS)
    assert stats["ce"] == 0.0 and stats["forward_kl"] > 0 and torch.isfinite(loss)


def test_ce_mean_counts_only_labelled_tokens():
    h, w, b, _, _, labels, mask = _inputs(seed=4)
    loss, stats = fused_logit_loss(h, (w, b), None, labels, mask, _terms(("ce", 1.0, {})),
                                   chunk_tokens=4)
    logits = F.linear(h, w, b)
    keep = mask & (labels != -100)
    ref = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(loss, ref)
    assert stats["ce"] == pytest.approx(ref.item(), rel=1e-6)


def test_frozen_head_no_grad_mode_and_grad_output_scaling():
    h, w, b, th, tw, labels, mask = _inputs(seed=5)
    w.requires_grad_(False)
    b.requires_grad_(False)
    loss, _ = fused_logit_loss(h, (w, b), TeacherHidden(th, tw), labels, mask, KD_TERMS)
    (3.0 * loss).backward(retain_graph=True)
    g3 = h.grad.clone()
    h.grad = None
    loss.backward()
    torch.testing.assert_close(g3, 3.0 * h.grad)
    assert w.grad is None and b.grad is None
    with torch.no_grad():
        plain, _ = fused_logit_loss(h, (w, b), TeacherHidden(th, tw), labels, mask, KD_TERMS)
    assert plain.grad_fn is None and plain.item() == pytest.approx(loss.item(), rel=1e-6)


def test_duplicate_terms_get_distinct_keys():
    h, w, b, th, tw, labels, mask = _inputs(seed=6)
    terms = _terms(("forward_kl", 1.0, {}), ("forward_kl", 1.0, {"temperature": 4.0}))
    _, stats = fused_logit_loss(h, (w, b), TeacherHidden(th, tw), labels, mask, terms)
    assert set(stats) == {"forward_kl", "forward_kl#2"}
    assert stats["forward_kl"] != stats["forward_kl#2"]


def test_bf16_inputs_accumulate_in_fp32_and_return_input_dtype():
    h, w, _b, th, tw, labels, mask = _inputs(seed=7)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    loss, _ = fused_logit_loss(hb, wb, TeacherHidden(th.bfloat16(), tw.bfloat16()), labels, mask,
                               KD_TERMS, chunk_tokens=6)
    gh, gw = torch.autograd.grad(loss, (hb, wb))
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    ref, _ = _reference(h, w, None, DenseTeacher(th @ tw.T), labels, mask, KD_TERMS)
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(gh.float(), rh, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(gw.float(), rw, rtol=5e-2, atol=5e-3)


def test_autocast_uses_the_autocast_dtype_and_returns_fp32_grads():
    h, w, b, th, tw, labels, mask = _inputs(seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_logit_loss(h, (w, b), TeacherHidden(th, tw), labels, mask, KD_TERMS)
    gh, gw, gb = torch.autograd.grad(loss, (h, w, b))
    assert gh.dtype == gw.dtype == gb.dtype == torch.float32
    ref, _ = _reference(h, w, b, DenseTeacher(th @ tw.T), labels, mask, KD_TERMS)
    assert loss.item() != ref.item()  # bf16 matmul really happened ...
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=3e-2)  # ... and is close


def test_fused_topk_matches_plain_autograd_on_full_logits():
    h, w, b, th, tw, labels, mask = _inputs(seed=9)
    source, dense = _teacher("topk", th, tw)
    fused, fstats = fused_logit_loss(h, (w, b), source, labels, mask, KD_TERMS, chunk_tokens=9)
    plain, pstats = _reference(h, w, b, dense, labels, mask, KD_TERMS)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert fstats == pytest.approx(pstats, rel=1e-5)


def test_bad_inputs_fail_before_work():
    h, w, b, th, tw, labels, mask = _inputs(seed=10)
    src = TeacherHidden(th, tw)
    cases = [
        ({"teacher": DenseTeacher(torch.zeros(N, V + 1))}, "teacher logits vocab 51"),
        ({"teacher": TeacherHidden(th[:-1], tw)}, "teacher has 36 tokens"),
        ({"teacher": None}, "loss 'forward_kl' needs teacher signals"),
        ({"labels": labels.clamp(min=0) + V}, "labels: .* outside \\[0, 50\\)"),
        ({"mask": mask[:-1]}, "mask must be \\[tokens\\]=37"),
        ({"terms": _terms(("hidden_mse", 1.0, {}))}, "feature loss"),
        ({"terms": _terms(("jsd", 1.0, {"beta": 2.0}))}, "param 'beta' must be in"),
        ({"chunk_tokens": 0}, "chunk_tokens must be a positive int"),
        ({"head": nn.Sequential(nn.Linear(H, V))}, "must be an nn.Linear"),
        ({"h": h[:, :5]}, "must be \\[tokens, 12\\]"),
        ({"teacher": DenseTeacher(torch.zeros(N, V, device="meta"))}, "move the teacher"),
    ]
    ids = torch.zeros(N, 3, dtype=torch.long)
    ids[0, 0] = V
    cases.append(({"teacher": TopKTeacher(ids, torch.zeros(N, 3), torch.zeros(N))},
                  "TopKTeacher.ids: 1 ids are outside"))
    for override, msg in cases:
        args = {"h": h, "head": (w, b), "teacher": src, "labels": labels, "mask": mask,
                "terms": KD_TERMS, "chunk_tokens": 8}
        args.update(override)
        with pytest.raises((ValueError, TypeError), match=msg):
            fused_logit_loss(args["h"], args["head"], args["teacher"], args["labels"],
                             args["mask"], args["terms"], chunk_tokens=args["chunk_tokens"])


# ---------------------------------------------------------------- real HF models, tied weights
def _tiny(model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 8, "max_position_embeddings": 64}
    cfg = AutoConfig.for_model(model_type, **{**kwargs, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def test_tied_embeddings_of_a_real_model_get_the_right_gradient():
    student = _tiny("llama", tie_word_embeddings=True)
    teacher = _tiny("llama", hidden_size=48, head_dim=12)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 11)
    mask[0, :4] = 0  # a prompt
    labels = ids[:, 1:].reshape(-1)
    terms = _terms(("forward_kl", 1.0, {"temperature": 2.0}), ("ce", 0.5, {}))
    with torch.no_grad():
        t_out = teacher.model(ids)
    source = TeacherHidden.from_head(t_out.last_hidden_state[:, :-1], teacher.lm_head)

    hidden = student.model(ids).last_hidden_state[:, :-1]
    loss, _ = fused_logit_loss(hidden, student.lm_head, source, labels, mask.reshape(-1), terms,
                               chunk_tokens=5)
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    logits = student(ids).logits[:, :-1].reshape(-1, 96)
    t_logits = teacher(ids).logits[:, :-1].reshape(-1, 96).detach()
    ref, _ = _reference_on_logits(logits, DenseTeacher(t_logits), labels, mask.reshape(-1), terms)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _reference_on_logits(z, teacher, labels, mask, terms):
    loss = 0.0
    for spec, weight, params in terms:
        per = spec.fn(z, teacher, labels, **params)
        loss = loss + weight * (per * mask).sum() / mask.sum()
    return loss, None


def test_gemma2_softcap_matches_the_model_own_loss():
    model = _tiny("gemma2", final_logit_softcapping=4.0, attn_logit_softcapping=None,
                  query_pre_attn_scalar=8, sliding_window=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits of a few units, where a cap of 4 bites
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, labels=ids).loss
        hidden = model.model(ids).last_hidden_state[:, :-1]
        got, _ = fused_logit_loss(hidden, model.lm_head, None, ids[:, 1:].reshape(-1), None,
                                  _terms(("ce", 1.0, {})), chunk_tokens=3,
                                  s_softcap=model.config.final_logit_softcapping)
        uncapped, _ = fused_logit_loss(hidden, model.lm_head, None, ids[:, 1:].reshape(-1), None,
                                       _terms(("ce", 1.0, {})))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(uncapped.item() - want.item()) > 1e-3  # the cap matters on these inputs


# ------------------------------------------------------------------------------ peak memory
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the mode (forward and backward), tracked
    exactly through weakref finalizers: CPU torch has no allocator statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, nbytes = st.data_ptr(), st.nbytes()
                if nbytes and key not in self._seen:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, nbytes)
        return out


def _peak_bytes(n: int, chunk: int, vocab: int) -> int:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, 16, generator=g, requires_grad=True)
    w = torch.randn(vocab, 16, generator=g, requires_grad=True)
    teacher = TeacherHidden(torch.randn(n, 8, generator=g), torch.randn(vocab, 8, generator=g))
    labels = torch.randint(0, vocab, (n,), generator=g)
    terms = _terms(("forward_kl", 1.0, {"temperature": 2.0}), ("jsd", 1.0, {}), ("ce", 1.0, {}))
    meter = LiveTensorBytes()
    with meter:
        loss, _ = fused_logit_loss(h, w, teacher, labels, None, terms, chunk_tokens=chunk)
        loss.backward()
    return meter.peak


def test_peak_memory_is_flat_in_the_number_of_chunks():
    chunk, vocab = 16, 2048
    chunk_bytes = chunk * vocab * 4  # one [chunk x vocab] fp32 tensor
    few, many = _peak_bytes(64, chunk, vocab), _peak_bytes(512, chunk, vocab)  # 4 vs 32 chunks
    # Growth allowed: only O(tokens x hidden) buffers (grad_h and its scaled copy, ~64 KB).
    assert many - few < chunk_bytes, (few, many)
    # The probe can fail: all 512 tokens in one chunk hold several [512 x vocab] tensors.
    whole = _peak_bytes(512, 512, vocab)
    assert whole - many > 4 * 512 * vocab * 4, (many, whole)
