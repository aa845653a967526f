"""On-policy distillation (`method: onpolicy`; GKD, Agarwal et al. 2024; on-policy distillation
as in Qwen3 and Thinking Machines): the student generates, the teacher scores the student's
own tokens, the student learns from that.

Per micro-batch the first `prompt_tokens` of each shard row are the prompt. With probability
`lambda` (seeded, the same draw on every rank) the batch is on-policy: the student samples
`completion_tokens` tokens after each prompt (`wattkd.generation.generate`, `temperature`,
`top_p`, stopping at EOS unless `stop_at_eos: false`); otherwise it is the dataset's own
continuation of the prompt (GKD's supervised batches). The teacher scores the whole sequence
online (full logits through its head, or their `teacher_topk` top-k + tail), and the method's
logit losses are computed on the completion tokens only, fused with the LM head like
`response`: `reverse_kl` (per-token reverse KL, exact over the vocabulary: the expectation of
the sampled-token estimator of on-policy distillation), `jsd` with `beta` (GKD), `forward_kl`.
Rollouts may be reused for `rollout_every` steps. The loop's side (rollouts, their RNG in the
checkpoint, energy windows per phase) is `wattkd.training.rollouts`.

    - name: onpolicy
      method: onpolicy
      params: {prompt_tokens: 32, completion_tokens: 32, lambda: 1.0, temperature: 1.0}
      losses: [{name: reverse_kl}]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from wattkd.distill.methods.registry import method_params, register_method
from wattkd.distill.methods.response import ResponseMode

if TYPE_CHECKING:
    from wattkd.config import ExperimentConfig, MethodConfig


class OnPolicyParams(BaseModel):
    """`params:` of an onpolicy method."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    prompt_tokens: int = Field(default=64, ge=1, description="prompt: the first tokens of a "
                               "shard row")
    completion_tokens: int = Field(default=64, ge=1, description="tokens the student generates "
                                   "(or the dataset continues) after the prompt")
    lmbda: float = Field(default=1.0, ge=0.0, le=1.0, alias="lambda",
                         description="probability that a micro-batch is on-policy (GKD)")
    rollout_every: int = Field(default=1, ge=1, description="fresh rollouts every k steps; "
                               "the steps between reuse the last ones")
    temperature: float = Field(default=1.0, ge=0.0, description="sampling temperature (0: "
                               "greedy)")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling cut")
    stop_at_eos: bool = Field(default=True, description="a completion ends at its first EOS")
    teacher_topk: int | None = Field(default=None, ge=1, description="score with the "
                                     "teacher's top-k + tail instead of its full logits")
    phase_every: int = Field(default=1, ge=0, description="energy windows per phase on every "
                             "k-th step (0: none)")

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@register_method("onpolicy", loss_kinds={"logit"}, params=OnPolicyParams, order=5,
                 colour="#17becf")
class OnPolicyMode(ResponseMode):
    """The losses are ResponseMode's (logit terms fused with the LM head); what differs is the
    batch, which `training.rollouts.RolloutSource` makes from the declared params."""

    def __init__(self, method: MethodConfig) -> None:
        super().__init__(method)
        self.rollout = method_params(method)

    @staticmethod
    def validate(method: MethodConfig, cfg: ExperimentConfig | None) -> list[str]:
        p = method_params(method)
        problems = []
        if cfg is not None and cfg.distill.teacher_signals != "online":
            problems.append("distill.teacher_signals: method onpolicy scores the student's own "
                            "tokens, which no teacher cache holds; expected online")
        if cfg is not None and p.sequence_tokens > cfg.data.seq_len:
            problems.append(f"params: prompt_tokens + completion_tokens = {p.sequence_tokens} "
                            f"exceeds data.seq_len {cfg.data.seq_len} (prompts and dataset "
                            "continuations are cut from shard rows)")
        return problems

    @classmethod
    def build(cls, method: MethodConfig, student: nn.Module, teacher_dims: object) -> nn.Module:
        return cls(method)
