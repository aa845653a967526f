"""The Triton LM-head KD kernels (distill/kernels/lm_head_kd.py) against plain autograd on the
full logits in fp64, and the path switch of fused_path. The kernels run compiled on CUDA when a
GPU is present (tensors built there), else on CPU through Triton's interpreter.
`benchmarks/kernel_tests_cuda.py` runs this file on a GPU, each case under a timeout, with
compile and run times per case."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

# The interpreter must be chosen before the kernels are decorated (module import). Other tests
# never force the triton path, so on CPU they are unaffected. TRITON_INTERPRET=1 set by hand
# keeps a CUDA machine on the interpreter (and the tensors on the CPU).
ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

from wattkd.distill.fused import TeacherHidden, fused_logit_loss
from wattkd.distill.fused import path as fused_path
from wattkd.distill.losses import DenseTeacher, TopKTeacher
from wattkd.distill.registry import get_loss

pytest.importorskip("triton", reason="triton not installed (pip install -e '.[dev]')")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA", allow_module_level=True)

N, H, HT, V = 29, 20, 24, 70   # V not a multiple of the tile: ragged last tile and split


@pytest.fixture(autouse=True)
def _one_tile_per_program(monkeypatch):
    """Several vocab splits even at V=70, so merging their partial statistics is tested."""
    from wattkd.distill.kernels import lm_head_kd

    monkeypatch.setattr(lm_head_kd, "TILES_PER_PROGRAM", [1])


def _terms(*items):
    return [(get_loss(name), w, params) for name, w, params in items]


def _inputs(seed=0, bias=True, n=N, v=V, device=DEVICE, hid=H, thid=HT):
    """Seeded on the CPU (the same numbers on every machine), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)

    def leaf(x):
        return x.to(device).requires_grad_(True)

    h = leaf(torch.randn(n, hid, generator=g))
    w = leaf(torch.randn(v, hid, generator=g) * 0.6)
    b = leaf(torch.randn(v, generator=g) * 0.3) if bias else None
    th = torch.randn(n, thid, generator=g).to(device)
    tw = (torch.randn(v, thid, generator=g) * 0.7).to(device)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    mask = torch.rand(n, generator=g) > 0.2
    return h, w, b, th, tw, labels.to(device), mask.to(device)


def _reference(h, w, b, th, tw, labels, mask, terms, s_cap, t_cap, topk=None):
    """Plain autograd on the full [N,V] logits in fp64, the reduction written out; the
    teacher dense (th @ tw^T) or, given `topk`, a TopKTeacher of those (ids, log-probs, tail)."""
    z = F.linear(h.double(), w.double(), None if b is None else b.double())
    if s_cap:
        z = torch.tanh(z / s_cap) * s_cap
    if topk is None:
        t = th.double() @ tw.double().T
        if t_cap:
            t = torch.tanh(t / t_cap) * t_cap
        teacher = DenseTeacher(t)
    else:
        teacher = TopKTeacher(topk[0].long(), topk[1].double(), topk[2].double())
    loss = 0.0
    for spec, weight, params in terms:
        per = spec.fn(z, teacher, labels, **params)
        counted = mask.double() * (labels != -100) if spec.needs_labels else mask.double()
        loss = loss + weight * (per * counted).sum() / counted.sum()
    return loss


def _run(path, monkeypatch, h, w, b, teacher, labels, mask, terms, s_cap, chunk):
    monkeypatch.setenv(fused_path.ENV, path)
    loss, stats = fused_logit_loss(h, (w, b), teacher, labels, mask, terms, chunk_tokens=chunk,
                                   s_softcap=s_cap)
    grads = torch.autograd.grad(loss, [x for x in (h, w, b) if x is not None])
    return loss, stats, grads


def _close(got, want, rel=1e-3):
    got, want = got.double(), want.double()
    err = ((got - want).norm() / want.norm()).item()
    assert err <= rel, f"relative error {err:.2e} > {rel}"


CASES = {
    "benchmark fkl": (_terms(("forward_kl", 1.0, {"temperature": 1.0})), None, None),
    "fkl T=2 + 0.5 ce": (_terms(("forward_kl", 1.0, {"temperature": 2.0}), ("ce", 0.5, {})),
                         None, None),
    "fkl+rkl+ce(ls) softcaps": (_terms(("forward_kl", 1.0, {"temperature": 1.5}),
                                       ("reverse_kl", 0.4, {"temperature": 1.5,
                                                            "scale_by_t2": False}),
                                       ("ce", 0.3, {"label_smoothing": 0.1})), 3.0, 2.5),
    "jsd(0.3) T=1.5 + 0.5 ce(ls) softcaps": (
        _terms(("jsd", 1.0, {"beta": 0.3, "temperature": 1.5}),
               ("ce", 0.5, {"label_smoothing": 0.1})), 3.0, 2.5),
    "fkl + jsd(0.7) no T^2 + rkl, T=2": (
        _terms(("forward_kl", 0.5, {"temperature": 2.0}),
               ("jsd", 1.0, {"beta": 0.7, "temperature": 2.0, "scale_by_t2": False}),
               ("reverse_kl", 0.2, {"temperature": 2.0})), None, None),
    "jsd beta=1 is reverse kl": (_terms(("jsd", 1.0, {"beta": 1.0})), None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_reference_values_and_grads(case, monkeypatch):
    terms, s_cap, t_cap = CASES[case]
    h, w, b, th, tw, labels, mask = _inputs()
    teacher = TeacherHidden(th, tw, softcap=t_cap)
    fused_path.reset()
    loss, stats, grads = _run("triton", monkeypatch, h, w, b, teacher, labels, mask, terms,
                              s_cap, chunk=16)
    assert fused_path.decisions()["used"] == {"triton": "forced"}
    ref = _reference(h, w, b, th, tw, labels, mask, terms, s_cap, t_cap)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    ref_grads = torch.autograd.grad(ref, [x for x in (h, w, b)])
    for got, want in zip(grads, ref_grads):
        assert got.abs().sum() > 0
        _close(got, want)
    # the per-term means agree with the generic path's
    _, gen_stats, _ = _run("generic", monkeypatch, h, w, b, teacher, labels, mask, terms,
                           s_cap, chunk=16)
    for key, value in gen_stats.items():
        assert stats[key] == pytest.approx(value, rel=1e-3, abs=1e-6)


def test_ce_only_without_teacher_and_bf16_inputs(monkeypatch):
    h, w, _, _, _, labels, mask = _inputs(seed=1, bias=False)
    terms = _terms(("ce", 1.0, {}))
    hb = h.detach().bfloat16().requires_grad_(True)
    wb = w.detach().bfloat16().requires_grad_(True)
    loss, _, (gh, gw) = _run("triton", monkeypatch, hb, wb, None, None, labels, mask, terms,
                             None, chunk=64)
    ref = _reference(hb.float(), wb.float(), None, torch.zeros(N, 1, device=DEVICE),
                     torch.zeros(V, 1, device=DEVICE),
                     labels, mask, terms, None, None)
    rh, rw = torch.autograd.grad(ref, [hb, wb])
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    _close(gh, rh, rel=1e-2)   # bf16 gradients: rounding of the returned tensors
    _close(gw, rw, rel=1e-2)


def test_unsupported_terms_fall_back_and_forcing_says_why(monkeypatch, caplog):
    h, w, b, th, tw, labels, mask = _inputs()
    tv = _terms(("tv", 1.0, {}))
    with pytest.raises(ValueError, match="forced.*'tv' has no Triton kernel"):
        _run("triton", monkeypatch, h, w, b, TeacherHidden(th, tw), labels, mask, tv, None, 16)
    with pytest.raises(ValueError, match="dense logits"):
        _run("triton", monkeypatch, h, w, b, DenseTeacher(th @ tw.T), labels, mask,
             _terms(("forward_kl", 1.0, {})), None, 16)
    # auto on CPU: never the kernel (the interpreter is for tests), decision recorded once
    h, w, b, th, tw, labels, mask = _inputs(device=torch.device("cpu"))
    fused_path.reset()
    with caplog.at_level(logging.INFO, logger="wattkd.distill.fused.path"):
        for _ in range(2):
            _run("auto", monkeypatch, h, w, b, TeacherHidden(th, tw), labels, mask,
                 _terms(("forward_kl", 1.0, {})), None, 16)
    assert fused_path.decisions() == {"requested": "auto", "used": {"eager": "auto"}}
    assert sum("fused logit loss" in r.message for r in caplog.records) == 1


def test_bad_path_names_the_key(monkeypatch):
    with pytest.raises(ValueError, match="distill.fused_kernel must be one of"):
        fused_path.set_path("fast")
    monkeypatch.setenv(fused_path.ENV, "cuda")
    with pytest.raises(ValueError, match="WATTKD_FUSED_KERNEL must be one of"):
        fused_path.requested()
    monkeypatch.delenv(fused_path.ENV)
    fused_path.set_path("generic")
    try:
        assert fused_path.requested() == "generic"
    finally:
        fused_path.set_path("auto")


def test_dense_logits_teacher_is_refused_by_the_kernel_spec():
    from wattkd.distill.kernels.lm_head_kd import kernel_spec

    spec, why = kernel_spec([("forward_kl", {})], "dense logits", None, None)
    assert spec is None and "dense logits" in why
    spec, why = kernel_spec([("forward_kl", {"temperature": 2.0}),
                             ("reverse_kl", {"temperature": 1.0})], "hidden", None, None)
    assert spec is None and "temperatures" in why


def _topk_of(th, tw, k, logits=None):
    """A cache-like TopKTeacher (int32 ids, fp16 log-probs and tail) of the dense teacher
    th @ tw^T, or of the teacher logits given."""
    logits = th @ tw.T if logits is None else logits
    lp, ids = logits.double().log_softmax(-1).topk(k, -1)
    tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6))
    return ids.to(torch.int32), lp.half(), tail.half()


TOPK_CASES = {
    "fkl": (_terms(("forward_kl", 1.0, {})), None, 5),
    "fkl T=2 + rkl + jsd(0.4) + 0.3 ce(ls), softcap, k=9": (
        _terms(("forward_kl", 1.0, {"temperature": 2.0}),
               ("reverse_kl", 0.3, {"temperature": 2.0}),
               ("jsd", 0.6, {"beta": 0.4, "temperature": 2.0}),
               ("ce", 0.3, {"label_smoothing": 0.1})), 3.0, 9),
    "confident student: fkl + rkl + jsd(0.5)": (
        _terms(("forward_kl", 1.0, {}), ("reverse_kl", 1.0, {}),
               ("jsd", 1.0, {"beta": 0.5})), None, 5),
}


@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_kernel_with_topk_teacher_equals_reference(case, monkeypatch):
    terms, s_cap, k = TOPK_CASES[case]
    h, w, b, th, tw, labels, mask = _inputs(seed=3)
    if case.startswith("confident"):
        # The student's mass outside the teacher's ids is far below fp32's 1 - sum(top-k)
        # resolution, the teacher's is not: forward KL's tail term log(P_tail / Q_tail) is
        # right only if the kernel's tail is an exact logsumexp over the other columns.
        with torch.no_grad():
            w.mul_(16.0)
            z = F.linear(h, w, b).double()
            topk = _topk_of(th, tw, k, logits=0.15 * z)
            q = z.log_softmax(-1)
            q_tail = q.scatter(1, topk[0].long(), -torch.inf).logsumexp(-1).exp()
        assert (q_tail < 1e-9).double().mean() > 0.5   # fp32 1 - sum resolves ~6e-8
    else:
        topk = _topk_of(th, tw, k)
    teacher = TopKTeacher(*topk)
    fused_path.reset()
    loss, stats, grads = _run("triton", monkeypatch, h, w, b, teacher, labels, mask, terms,
                              s_cap, chunk=16)
    assert fused_path.decisions()["used"] == {"triton": "forced"}
    ref = _reference(h, w, b, None, None, labels, mask, terms, s_cap, None, topk=topk)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    ref_grads = torch.autograd.grad(ref, [h, w, b])
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all() and got.abs().sum() > 0
        _close(got, want)
    _, gen_stats, _ = _run("generic", monkeypatch, h, w, b, teacher, labels, mask, terms,
                           s_cap, chunk=16)
    for key, value in gen_stats.items():
        assert stats[key] == pytest.approx(value, rel=1e-3, abs=1e-6)


def test_topk_bitmap_marks_exactly_the_ids():
    from wattkd.distill.kernels.lm_head_kd import _bitmap

    ids = torch.tensor([[0, 31, 32, 69], [63, 5, 64, 30]], dtype=torch.int32)
    words = _bitmap(ids.to(DEVICE), 70).cpu()
    assert words.shape == (2, 3) and words.dtype == torch.int32
    bits = (words[:, :, None] >> torch.arange(32)) & 1        # [rows, words, 32]
    member = bits.reshape(2, -1)[:, :70].bool()
    want = torch.zeros(2, 70, dtype=torch.bool).scatter(1, ids.long(), True)
    assert torch.equal(member, want)


def test_jsd_kernel_spec_maps_the_ends_and_refuses_mixed_betas():
    from wattkd.distill.kernels.lm_head_kd import kernel_spec

    spec, _ = kernel_spec([("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0})], "hidden", None,
                          None)
    assert [name for name, _, _ in spec.terms] == ["forward_kl", "reverse_kl"]
    spec, why = kernel_spec([("jsd", {"beta": 0.2}), ("jsd", {"beta": 0.6})], "hidden", None,
                            None)
    assert spec is None and "different beta" in why
    spec, _ = kernel_spec([("jsd", {}), ("ce", {})], "top-k", 2.0, 5.0)
    assert spec.topk and not spec.has_teacher and spec.t_cap is None
    assert spec.terms[0] == ("jsd", 1.0, 0.5)


def test_topk_teacher_with_bf16_inputs(monkeypatch):
    """The cache path as training runs it: bf16 hidden and head, no bias, bf16 gradients."""
    h, w, _, th, tw, labels, mask = _inputs(seed=4, bias=False)
    topk = _topk_of(th, tw, 6)
    terms = _terms(("forward_kl", 1.0, {}), ("ce", 0.5, {}))
    hb = h.detach().bfloat16().requires_grad_(True)
    wb = w.detach().bfloat16().requires_grad_(True)
    loss, _, (gh, gw) = _run("triton", monkeypatch, hb, wb, None, TopKTeacher(*topk), labels,
                             mask, terms, None, chunk=16)
    ref = _reference(hb.float(), wb.float(), None, None, None, labels, mask, terms, None, None,
                     topk=topk)
    rh, rw = torch.autograd.grad(ref, [hb, wb])
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    _close(gh, rh, rel=1e-2)   # bf16 gradients: rounding of the returned tensors
    _close(gw, rw, rel=1e-2)


PRODUCTION_CASES = {
    "dense fkl + rkl + ce, softcaps": (_terms(("forward_kl", 1.0, {}), ("reverse_kl", 0.5, {}),
                                              ("ce", 0.5, {})), 30.0, 30.0, None),
    "dense jsd(0.5) T=2 + ce(ls)": (_terms(("jsd", 1.0, {"beta": 0.5, "temperature": 2.0}),
                                           ("ce", 0.2, {"label_smoothing": 0.1})), None, None,
                                    None),
    "top-64 fkl + ce": (_terms(("forward_kl", 1.0, {}), ("ce", 0.5, {})), None, None, 64),
}


@pytest.mark.skipif(not ON_CUDA, reason="the GPU's own tiles (BLOCKS) need CUDA")
@pytest.mark.parametrize("case", list(PRODUCTION_CASES))
def test_production_tiles_bf16_on_cuda(case, monkeypatch):
    """bf16 inputs at the tiles training uses (BLOCKS: 128-wide, tensor-core dots), a ragged
    vocabulary of many splits and hidden sizes over one BK step; fp64 reference."""
    terms, s_cap, t_cap, k = PRODUCTION_CASES[case]
    h, w, _, th, tw, labels, mask = _inputs(seed=5, bias=False, n=300, v=4099, hid=192,
                                            thid=160)
    hb, wb = (x.detach().bfloat16().requires_grad_(True) for x in (h, w))
    thb, twb = th.bfloat16(), tw.bfloat16()
    if k is None:
        teacher, topk = TeacherHidden(thb, twb, softcap=t_cap), None
    else:
        topk = _topk_of(thb.double(), twb.double(), k)
        teacher = TopKTeacher(*topk)
    loss, _, (gh, gw) = _run("triton", monkeypatch, hb, wb, None, teacher, labels, mask, terms,
                             s_cap, chunk=128)
    ref = _reference(hb.float(), wb.float(), None, thb.float(), twb.float(), labels, mask,
                     terms, s_cap, t_cap, topk=topk)
    rh, rw = torch.autograd.grad(ref, [hb, wb])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    _close(gh, rh, rel=1e-2)   # bf16 gradients: rounding of the returned tensors
    _close(gw, rw, rel=1e-2)
