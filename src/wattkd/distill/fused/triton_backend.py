"""Glue between the fused loss's chunk loop and the Triton kernels (kernels/lm_head_kd.py): when
the requested path (fused_path) takes them, and one chunk through them. The kernels are an
optional dependency (triton), imported only when a kernel is asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from wattkd.distill import losses
from wattkd.distill.fused import path as fused_path
from wattkd.distill.fused.inputs import Plan, TeacherHidden, same_device
from wattkd.distill.losses import TopKTeacher


def triton_spec(plan: Plan, dev: torch.device, w: Tensor) -> Any:
    """The Triton kernel's spec for `plan` when the requested path allows it and the kernel
    supports the terms/teacher/device, else None (the decision and its reason are recorded;
    a forced `triton` that cannot apply is an error naming why)."""
    want = fused_path.requested()
    if want != "triton" and not (want == "auto" and fused_path.AUTO_USES_TRITON):
        return None
    why = fused_path.triton_usable(dev.type, forced=want == "triton")
    spec = None
    if not why:
        from wattkd.distill.kernels.lm_head_kd import kernel_spec  # lazy: triton is optional

        known = {"forward_kl": losses.forward_kl, "reverse_kl": losses.reverse_kl,
                 "jsd": losses.jsd, "ce": losses.ce}
        teacher = plan.teacher
        kind = ("none" if teacher is None else "hidden" if isinstance(teacher, TeacherHidden)
                else "top-k" if isinstance(teacher, TopKTeacher) else "dense logits")
        other = [s.name for s, _, _ in plan.terms if known.get(s.name) is not s.fn]
        if other:
            why = f"loss {other[0]!r} has no Triton kernel"
        elif kind == "hidden" and not same_device(teacher.weight.device, dev):
            why = "teacher head on another device"
        else:
            spec, why = kernel_spec([(s.name, p) for s, _, p in plan.terms], kind,
                                    plan.softcap,
                                    teacher.softcap if isinstance(teacher, TeacherHidden)
                                    else None)
    if spec is None and want == "triton":
        raise ValueError(f"fused_kernel=triton was forced but the Triton kernel cannot "
                         f"compute this loss: {why}")
    if spec is not None:
        fused_path.record("triton", "forced" if want == "triton" else "auto")
    elif dev.type == "cuda":
        fused_path.record("triton-unavailable", why)
    return spec


def triton_chunk(spec: Any, plan: Plan, rows: slice | Tensor, h_c: Tensor, w_mm: Tensor,
                 b_mm: Tensor | None, labels_c: Tensor, track: bool, dz_dtype: torch.dtype
                 ) -> tuple[Tensor | None, Tensor]:
    """One chunk through the Triton kernels: (dz or None, per-term sums)."""
    from wattkd.distill.kernels.lm_head_kd import chunk  # lazy: triton is optional

    th = tw = tb = None
    teacher = plan.teacher
    if spec.has_teacher:
        tw = teacher.weight.detach()
        th = teacher.hidden[rows].detach().to(tw.device, tw.dtype)
        tb = None if teacher.bias is None else teacher.bias.detach().to(tw.dtype)
    topk = None
    if spec.topk:
        topk = (teacher.ids[rows], teacher.logprobs[rows], teacher.tail_logprob[rows])
    with torch.no_grad():
        return chunk(spec, plan.coef, h_c, w_mm, b_mm, th, tw, tb, labels_c, track, dz_dtype,
                     topk)
