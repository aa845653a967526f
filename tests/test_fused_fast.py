"""The analytic fast path of the fused logit loss gives the generic autograd path's numbers."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wattkd.distill import losses, registry
from wattkd.distill.fused import TeacherHidden, fused_logit_loss
from wattkd.distill.fused import fast as fused_fast
from wattkd.distill.fused import inputs as fused_inputs
from wattkd.distill.fused import loop as fused
from wattkd.distill.fused.fast import fast_cfg as _fast_cfg
from wattkd.distill.fused.inputs import prepare as _prepare
from wattkd.distill.fused.loop import _run
from wattkd.distill.losses import DenseTeacher, TopKTeacher
from wattkd.distill.registry import get_loss

N, H, HT, V, K = 45, 12, 10, 64, 8


def _terms(*items):
    return [(get_loss(name), w, params) for name, w, params in items]


TERM_SETS = {
    "fkl": _terms(("forward_kl", 1.0, {})),
    "fkl_t2_ce": _terms(("forward_kl", 1.0, {"temperature": 2.0}), ("ce", 0.5, {})),
    "rkl_ce_ls": _terms(("reverse_kl", 0.7, {"temperature": 0.5, "scale_by_t2": False}),
                        ("ce", 0.4, {"label_smoothing": 0.1})),
    "all_dup": _terms(("forward_kl", 1.0, {"temperature": 4.0}), ("reverse_kl", 0.3, {}),
                      ("forward_kl", 0.2, {}), ("ce", 1.0, {"label_smoothing": 0.2})),
}


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype) * 0.7
    b = torch.randn(V, generator=g, dtype=dtype) * 0.1
    th = torch.randn(N, HT, generator=g, dtype=dtype)
    tw = torch.randn(V, HT, generator=g, dtype=dtype) * 0.7
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    mask = torch.rand(N, generator=g) > 0.25
    return h, w, b, th, tw, labels, mask


def _topk(logits, k=K):
    logp = F.log_softmax(logits.float(), -1)
    lp, ids = logp.topk(k, -1)
    return TopKTeacher(ids, lp, torch.logsumexp(logp.scatter(1, ids, -math.inf), -1))


def _source(kind, th, tw, t_cap=None):
    if kind == "hidden":
        return TeacherHidden(th, tw, softcap=t_cap)
    logits = th @ tw.T
    if kind == "dense":
        return DenseTeacher(logits)
    return _topk(logits) if kind == "topk" else None


def _both(plan, h, w, b, need=(True, True, True), **kw):
    fast = _run(plan, h, w, b, need, fast=True, compile_backend=None, **kw)
    generic = _run(plan, h, w, b, need, fast=False)
    return fast, generic


def _assert_same(fast, generic, rtol=1e-5):
    """Same within fp32 rounding: losses elementwise; gradients in norm and elementwise up to
    rtol x their largest entry (the two paths round differently where terms nearly cancel)."""
    for name, got, want in zip(("loss", "sums", "grad_h", "grad_w", "grad_b"), fast, generic):
        if want is None:
            assert got is None, name
            continue
        if name in ("loss", "sums"):
            torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6, msg=name)
            continue
        rel = ((got - want).norm() / want.norm()).item()
        worst = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < rtol and worst < rtol, (name, rel, worst)


@pytest.mark.parametrize("kind", ["hidden", "dense", "topk", "none"])
@pytest.mark.parametrize("terms", list(TERM_SETS))
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_fast_path_equals_generic(kind, terms, softcap):
    h, w, b, th, tw, labels, mask = _data()
    ts = TERM_SETS[terms] if kind != "none" else _terms(("ce", 1.0, {"label_smoothing": 0.1}))
    source = _source(kind, th * 3, tw, t_cap=4.0 if softcap else None)
    plan = _prepare(N, V, h.device, source, labels, mask, ts, 16, softcap)
    assert _fast_cfg(plan, True, torch.float32) is not None  # the fast path is really taken
    fast, generic = _both(plan, h, w, b)
    assert all(g.abs().sum() > 0 for g in fast[2:])
    _assert_same(fast, generic)


def test_no_grad_and_partial_grads_match():
    h, w, b, th, tw, labels, _mask = _data(seed=1)
    plan = _prepare(N, V, h.device, _source("hidden", th, tw), labels, None,
                    TERM_SETS["all_dup"], 7, None)
    for need in [(False, False, False), (True, False, False), (False, True, False)]:
        fast, generic = _both(plan, h, w, b, need)
        _assert_same(fast, generic)


def test_fused_logit_loss_uses_fast_path_and_matches_full_autograd():
    h, w, b, th, tw, labels, mask = _data(seed=2)
    h, w, b = (x.requires_grad_(True) for x in (h, w, b))
    terms = TERM_SETS["fkl_t2_ce"]
    loss, _stats = fused_logit_loss(h, (w, b), TeacherHidden(th, tw), labels, mask, terms,
                                   chunk_tokens=10)
    z = F.linear(h, w, b)
    m = mask.float()
    ref = 0.0
    for spec, weight, params in terms:
        per = spec.fn(z, DenseTeacher(th @ tw.T), labels, **params)
        counted = m * (labels != -100) if spec.needs_labels else m
        ref = ref + weight * (per * counted).sum() / counted.sum()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_fast_equals_generic_up_to_dz_rounding():
    h, w, _b, th, tw, labels, mask = _data(seed=3)
    plan = _prepare(N, V, h.device, _source("hidden", th.bfloat16(), tw.bfloat16()), labels,
                    mask, TERM_SETS["fkl_t2_ce"], 16, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, generic = _both(plan, h, w, None, (True, True, False))
    torch.testing.assert_close(fast[0], generic[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], generic[1], rtol=1e-5, atol=1e-6)
    for got, want in zip(fast[2:4], generic[2:4]):  # both round dz to bf16: rare 1-ulp flips
        assert got.dtype == torch.float32
        assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_topk_forward_kl_gradient_is_the_closed_form():
    """dL/dz_j = q_j (1 - r) for all j, plus (-p_k + q_{id_k} r) at id_k, r = p_tail/q_tail."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, V, generator=g) * 2
    teacher = _topk(torch.randn(6, V, generator=g) * 2)
    labels = torch.full((6,), -100)
    dz, sums, dz_ids = fused_fast.topk_body(
        z, teacher.ids, teacher.logprobs, teacher.tail_logprob, labels, torch.ones(1),
        terms=((get_loss("forward_kl").closed_form, 1.0, 1.0, ()),), s_cap=None, grad=True,
        dz_dtype=torch.float64)
    dz.scatter_(1, teacher.ids, dz_ids.double())
    q = z.double().softmax(-1)
    p_k, p_tail = teacher.logprobs.double().exp(), teacher.tail_logprob.double().exp()
    q_ids = q.gather(1, teacher.ids)
    r = p_tail / (1 - q_ids.sum(-1))
    want = q * (1 - r)[:, None]
    want.scatter_add_(1, teacher.ids, -p_k + q_ids * r[:, None])
    torch.testing.assert_close(dz, want, rtol=1e-4, atol=1e-7)
    kl = (p_k * (p_k.log() - q_ids.log())).sum() + (p_tail * (p_tail / (1 - q_ids.sum(-1))).log()
                                                     ).sum()
    torch.testing.assert_close(sums[0].double(), kl, rtol=1e-5, atol=1e-6)


def test_topk_tiny_student_tail_and_dense_teacher_with_minus_inf():
    h, w, b, th, tw, labels, mask = _data(seed=5)
    t_logits = th @ tw.T
    teacher = _topk(t_logits)
    # A sharp student (8x the teacher's logits): its mass outside the teacher's top-8 is down
    # to e^-51, where a tail computed as 1 - sum(top) would lose every digit.
    sharp_h, sharp_w = th, tw * 8
    logq = (sharp_h @ sharp_w.T).double().log_softmax(-1)
    log_tail = torch.logsumexp(logq.scatter(1, teacher.ids, -math.inf), -1)
    assert log_tail.min() < -40 and log_tail.median() < -15
    plan = _prepare(N, V, h.device, teacher, labels, mask,
                    _terms(("forward_kl", 1.0, {}), ("reverse_kl", 1.0, {})), 16, None)
    fast, generic = _both(plan, sharp_h, sharp_w, None)
    _assert_same(fast, generic)
    # A dense teacher that rules out part of the vocabulary (-inf logits).
    t_masked = t_logits.clone()
    t_masked[:, ::3] = -math.inf
    plan = _prepare(N, V, h.device, DenseTeacher(t_masked), labels, mask,
                    TERM_SETS["all_dup"], 16, None)
    fast, generic = _both(plan, h, w, b)
    assert all(torch.isfinite(x).all() for x in fast)
    _assert_same(fast, generic)


def test_other_terms_fall_back_to_generic(monkeypatch):
    """A loss registered without a closed form sends the whole plan to the generic path."""
    monkeypatch.setattr(registry, "LOSSES", dict(registry.LOSSES))

    @registry.register_loss("plain_fkl", kind="logit")
    def plain_fkl(s_logits, teacher, labels, *, temperature: float = 1.0):
        return losses.forward_kl(s_logits, teacher, labels, temperature=temperature)

    h, _w, _b, th, tw, labels, mask = _data(seed=6)
    mixed = _terms(("forward_kl", 1.0, {}), ("plain_fkl", 1.0, {}))
    for source in (_source("hidden", th, tw), _source("topk", th, tw)):
        plan = _prepare(N, V, h.device, source, labels, mask, mixed, 16, None)
        assert _fast_cfg(plan, True, torch.float32) is None
    plan = _prepare(N, V, h.device, _source("dense", th, tw), labels, mask,
                    TERM_SETS["fkl"], 16, None)
    assert _fast_cfg(plan, True, torch.float32) is not None


def test_env_switches(monkeypatch):
    h, _w, _b, th, tw, labels, mask = _data(seed=7)
    plan = _prepare(N, V, h.device, _source("dense", th, tw), labels, mask, TERM_SETS["fkl"],
                    16, None)
    monkeypatch.setenv("WATTKD_FAST_LOSS", "0")
    assert _fast_cfg(plan, True, torch.float32) is None
    monkeypatch.delenv("WATTKD_FAST_LOSS")
    monkeypatch.delenv("WATTKD_COMPILE", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused._auto_path(cuda) == (True, "inductor")  # default on GPUs: compiled fast path
    assert fused._auto_path(cpu) == (True, None)         # CPU (CI): eager fast, never compiled
    monkeypatch.setenv("WATTKD_COMPILE", "0")
    # the eager fast path is slower than the generic one on a GPU: generic without the compiler
    assert fused._auto_path(cuda) == (False, None)
    monkeypatch.setenv("WATTKD_COMPILE", "1")
    assert fused._auto_path(cuda) == (True, "inductor")


def test_same_device():
    assert fused_inputs.same_device(torch.device("cpu"), torch.device("cpu"))
    assert not fused_inputs.same_device(torch.device("cpu"), torch.device("cuda:0"))
    assert fused_inputs.same_device(torch.device("cuda:1"), torch.device("cuda:1"))
    assert not fused_inputs.same_device(torch.device("cuda:0"), torch.device("cuda:1"))


# ---------------------------------------------------------------------------- torch.compile
def test_compiled_chunk_is_one_graph_for_every_chunk_length():
    """Dynamo traces the whole chunk (fullgraph) once per term configuration; full and partial
    chunks of any length reuse it (the row dim is dynamic). A counting backend stands in for
    inductor, whose Triton kernels need a GPU."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    h, w, b, th, tw, labels, _ = _data(seed=8)
    g = torch.Generator().manual_seed(9)
    for source, terms in ((_source("hidden", th, tw, t_cap=3.0), TERM_SETS["all_dup"]),
                          (_source("topk", th, tw), TERM_SETS["all_dup"])):
        before = len(graphs)
        for keep in (0.9, 0.6, 0.75):  # 16-row chunks, then last chunks of varying length
            mask = torch.rand(N, generator=g) < keep
            plan = _prepare(N, V, h.device, source, labels, mask, terms, 16, 2.0)
            fast = _run(plan, h, w, b, (True, True, True), compile_backend=counting)
            _assert_same(fast, _run(plan, h, w, b, (True, True, True), fast=False))
        assert len(graphs) - before == 1
    assert not fused.STATE.compile_broken


def test_compile_failure_logs_once_and_stays_correct(caplog, monkeypatch):
    monkeypatch.setattr(fused.STATE, "compile_broken", "")

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    h, w, b, th, tw, labels, mask = _data(seed=10)
    plan = _prepare(N, V, h.device, _source("dense", th, tw), labels, mask,
                    TERM_SETS["fkl_t2_ce"], 16, None)
    with caplog.at_level(logging.WARNING, logger="wattkd.distill.fused"):
        fast = _run(plan, h, w, b, (True, True, True), compile_backend=broken)
    _assert_same(fast, _run(plan, h, w, b, (True, True, True), fast=False))
    warnings = [r for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    assert fused.STATE.compile_broken and not fused._compile_wanted(torch.device("cuda"))


def test_selfcheck_runs_on_cpu(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fused_selfcheck.py"
    spec = importlib.util.spec_from_file_location("fused_selfcheck", path)
    selfcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selfcheck)
    assert selfcheck.main(["--vocab", "512", "--hidden", "16", "--chunk", "32",
                           "--topk", "8", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "selfcheck OK" in out and out.count(" ok") >= 8


# ------------------------------------------------------------------ closed forms in the registry
def test_a_new_loss_with_a_closed_form_takes_the_fast_path(monkeypatch):
    """Registering a logit loss with its closed form is all the fast path needs: no name in
    fused*.py. (A scaled forward KL, written as a new loss would be.)"""
    monkeypatch.setattr(registry, "LOSSES", dict(registry.LOSSES))

    def half_pair(lq, lp, grad):
        value, dx = losses._forward_kl_pair(lq, lp, grad)
        return 0.5 * value, None if dx is None else 0.5 * dx

    @registry.register_loss("half_fkl", kind="logit", closed_form=registry.TeacherForm(half_pair))
    def half_fkl(s_logits, teacher, labels, *, temperature: float = 3.0,
                 scale_by_t2: bool = True):
        return 0.5 * losses.forward_kl(s_logits, teacher, labels, temperature=temperature,
                                       scale_by_t2=scale_by_t2)

    h, w, b, th, tw, labels, mask = _data(seed=11)
    terms = _terms(("half_fkl", 1.0, {}), ("ce", 0.5, {}))
    for kind in ("hidden", "topk"):
        plan = _prepare(N, V, h.device, _source(kind, th, tw), labels, mask, terms, 16, None)
        cfg = _fast_cfg(plan, True, torch.float32)
        assert cfg is not None and cfg.terms[0][1:3] == (3.0, 9.0)  # the registry's default T
        _assert_same(*_both(plan, h, w, b))


@pytest.mark.parametrize("name", sorted(n for n, s in registry.LOSSES.items() if s.closed_form))
def test_every_registered_closed_form_matches_its_loss(name):
    """A loss registered with a closed form gets it checked here against autograd through the
    loss itself, on a dense and a top-k teacher (or none), with a softcap."""
    spec = get_loss(name)
    h, w, b, th, tw, labels, mask = _data(seed=12)
    for kind in ("hidden", "dense", "topk") if spec.needs_teacher else ("none",):
        plan = _prepare(N, V, h.device, _source(kind, th * 2, tw), labels, mask,
                        _terms((name, 0.8, {})), 16, 3.0)
        assert _fast_cfg(plan, True, torch.float32) is not None
        _assert_same(*_both(plan, h, w, b))


def test_closed_forms_are_checked_at_registration(monkeypatch):
    monkeypatch.setattr(registry, "LOSSES", dict(registry.LOSSES))
    pair = registry.TeacherForm(losses._forward_kl_pair)

    def no_temperature(s_logits, teacher, labels):
        return s_logits.sum(-1)

    with pytest.raises(ValueError, match="temperature"):
        registry.register_loss("bad1", kind="logit", closed_form=pair)(no_temperature)
    with pytest.raises(ValueError, match="only logit losses"):
        registry.register_loss("bad2", kind="feature", closed_form=pair)(no_temperature)
    ce_form = get_loss("ce").closed_form
    with pytest.raises(ValueError, match="needs_labels"):
        registry.register_loss("bad3", kind="logit", closed_form=ce_form)(no_temperature)
    assert not {"bad1", "bad2", "bad3"} & set(registry.LOSSES)


# ------------------------------------------------------------------ closed forms across params
PARAM_CASES = [
    ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.5, "temperature": 2.0}),
    ("jsd", {"beta": 0.9, "temperature": 0.5, "scale_by_t2": False}),
    ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0, "temperature": 3.0}),
    ("tv", {}), ("tv", {"temperature": 2.5}),
    ("forward_kl", {"temperature": 0.7}), ("reverse_kl", {"temperature": 4.0}),
    ("ce", {"label_smoothing": 0.3}),
]


@pytest.mark.parametrize("name,params", PARAM_CASES, ids=[f"{n}-{p}" for n, p in PARAM_CASES])
@pytest.mark.parametrize("kind,k", [("hidden", None), ("dense", None), ("topk", 1),
                                    ("topk", 5), ("topk", V)])
def test_closed_forms_match_autograd_across_params(name, params, kind, k):
    """Each parameterised loss (jsd's beta, temperature, T^2 scaling, ce's smoothing) takes the
    fast path with its own params and matches autograd through the loss itself, on top-k
    teachers of several k (k = V: an empty tail)."""
    h, w, b, th, tw, labels, mask = _data(seed=13)
    source = _topk(th @ tw.T * 2, k) if kind == "topk" else _source(kind, th * 2, tw)
    plan = _prepare(N, V, h.device, source, labels, mask, _terms((name, 0.9, params)), 16, 3.0)
    cfg = _fast_cfg(plan, True, torch.float32)
    assert cfg is not None
    form_params = dict(cfg.terms[0][3])
    for key, value in params.items():
        if key not in ("temperature", "scale_by_t2"):
            assert form_params[key] == value   # the closed form gets the term's own params
    fast, generic = _both(plan, h, w, b)
    assert all(g.abs().sum() > 0 for g in fast[2:])
    _assert_same(fast, generic)
