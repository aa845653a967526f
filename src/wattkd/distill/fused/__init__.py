"""Logit losses fused with the LM head, in token chunks (memory flat in vocab and tokens).

One package, one job each: `loop` (the chunk loop, its dispatch and run-time state), `inputs`
(validation of a call into a Plan), `fast` (a chunk from the closed forms registered with the
losses), `triton_backend` (glue to the Triton kernels in distill/kernels/) and `path` (which
implementation runs, and the record of what ran). Callers use the names below.
"""

from wattkd.distill.fused.inputs import TeacherHidden, TeacherSource, Terms, head_params
from wattkd.distill.fused.loop import fused_logit_loss

__all__ = ["TeacherHidden", "TeacherSource", "Terms", "fused_logit_loss", "head_params"]
