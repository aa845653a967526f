"""The loop's side of on-policy distillation (distill/methods/onpolicy.py).

`RolloutSource.batch` turns a shard batch into the step's sequences: prompt + the student's
sampled completion (on-policy, drawn with probability lambda per micro-batch, the same draw on
every rank) or prompt + the dataset's continuation, with `loss_mask` on the completion only.
Sampling uses this rank's own torch.Generator (seeded by run seed and rank); its state and the
rollouts kept for reuse go into the checkpoint's rng.pt entry of the rank, so a resumed run
draws the same rollouts bit for bit. `TopKScores` turns the online teacher's full logits into
top-k + tail when asked. `StepPhases` meters the step's phases as nested energy windows of the
ledger: `step` > `rollout` | `score` | `update` (docs/metrics.md).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wattkd.distill.losses import TopKTeacher
from wattkd.distill.signals import TeacherSignals, topk_logprobs
from wattkd.generation import SamplingParams, generate
from wattkd.generation.graph_engine import is_sharded

PHASES = ("rollout", "score", "update")   # energy windows inside a `step` window
STATE_KEY = "rollouts"                    # this module's entry in a rank's rng.pt state


def is_on_policy(seed: int, step: int, micro: int, lmbda: float) -> bool:
    """GKD's coin: micro-batch `micro` of step `step` is on-policy with probability lambda.
    A pure function of (seed, step, micro): all ranks agree and a resumed run draws the same."""
    if lmbda >= 1.0:
        return True
    if lmbda <= 0.0:
        return False
    return random.Random(f"wattkd-onpolicy:{seed}:{step}:{micro}").random() < lmbda


def rank_seed(seed: int, rank: int) -> int:
    return random.Random(f"wattkd-rollouts:{seed}:{rank}").getrandbits(63)


class RolloutSource:
    """Shard batches -> on-policy or dataset sequences of prompt_tokens + completion_tokens."""

    def __init__(self, params: Any, student: nn.Module, *, seed: int, rank: int,
                 device: torch.device, eos_token_id: int | None, autocast: Any = nullcontext,
                 decode_dtype: torch.dtype | None = None) -> None:
        self.p = params
        self.student = student
        self.seed = seed
        self.device = torch.device(device)
        self.autocast = autocast
        self.decoder = DecodeCopy.maybe(student, decode_dtype, self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(rank_seed(seed, rank))
        self.sampling = SamplingParams(
            max_new_tokens=params.completion_tokens, temperature=params.temperature,
            top_p=params.top_p, eos_token_id=eos_token_id if params.stop_at_eos else None,
            pad_token_id=eos_token_id if eos_token_id is not None else 0)
        self.kept: dict[int, dict[str, Any]] = {}   # micro index -> rollout kept for reuse
        self.last_new_tokens = 0                     # tokens the last batch() generated

    @property
    def sequence_tokens(self) -> int:
        return int(self.p.sequence_tokens)

    def batch(self, batch: dict[str, torch.Tensor], step: int, micro: int
              ) -> dict[str, torch.Tensor]:
        """The sequences micro-batch `micro` of (0-based) step `step` trains on."""
        self.last_new_tokens = 0
        if not is_on_policy(self.seed, step, micro, self.p.lmbda):
            return self.dataset(batch)
        kept = self.kept.get(micro)
        if kept is not None and step - kept["step"] < self.p.rollout_every:
            return {"input_ids": kept["input_ids"], "loss_mask": kept["loss_mask"]}
        out = self.rollout(batch["input_ids"][:, :self.p.prompt_tokens])
        self.kept[micro] = {"step": step, **out}
        return out

    def dataset(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GKD's supervised batch: the prompt and the row's own continuation."""
        n, p = self.sequence_tokens, self.p.prompt_tokens
        ids = batch["input_ids"][:, :n].to(self.device)
        given = batch.get("loss_mask")
        mask = (torch.ones_like(ids) if given is None else given[:, :n].to(self.device)).clone()
        mask[:, :p] = 0
        return {"input_ids": ids, "loss_mask": mask}

    @torch.no_grad()
    def rollout(self, prompts: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.decoder is not None:   # one dtype, no autocast: the graph engine's case
            r = generate(self.decoder.refreshed(), prompts.to(self.device), None, self.sampling,
                         generator=self.generator)
            self.last_new_tokens = r.new_tokens
            return {"input_ids": r.sequences, "loss_mask": r.generated_mask.long()}
        was_training = self.student.training
        self.student.eval()
        try:
            with self.autocast():
                r = generate(self.student, prompts.to(self.device), None, self.sampling,
                             generator=self.generator)
        finally:
            self.student.train(was_training)
        self.last_new_tokens = r.new_tokens
        return {"input_ids": r.sequences, "loss_mask": r.generated_mask.long()}

    # ---- exact resume
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints (rng.pt loads with weights_only=True)."""
        return {"generator": self.generator.get_state(),
                "kept": {m: {"step": k["step"], "input_ids": k["input_ids"].cpu(),
                             "loss_mask": k["loss_mask"].cpu()} for m, k in self.kept.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.kept = {int(m): {"step": int(k["step"]),
                              "input_ids": k["input_ids"].to(self.device),
                              "loss_mask": k["loss_mask"].to(self.device)}
                     for m, k in state["kept"].items()}


class DecodeCopy:
    """The student in the dtype rollouts decode in. Training keeps fp32 master weights under
    bf16 autocast, but the graph engine traces and captures one dtype (under autocast, HF's
    forward mixes fp32 and bf16 key states and the static cache refuses them), so on CUDA a
    student stored in another dtype is decoded from a copy in `dtype`: parameters cast (buffers
    such as rotary frequencies stay as they are, as under autocast), copied in place from the
    student before each rollout, so a captured graph keeps pointing at the same storage. Costs
    one copy of the parameters in `dtype` (2 bytes each in bf16) and one device copy per
    rollout.

    The copy is made where the student is, cast, then moved to `device`, where rollouts run:
    the loop builds the student on the CPU and accelerate moves it to the GPU only later, so a
    copy left where the student was at first would decode on the CPU (found on the GPU)."""

    def __init__(self, student: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.student = student
        self.copy = copy.deepcopy(student).eval().requires_grad_(False)
        for p in self.copy.parameters():
            p.data = p.data.to(dtype)
        self.copy.to(device)
        # by name: moving a module may swap its parameter objects (ties included)
        own = dict(self.copy.named_parameters(remove_duplicate=False))
        targets = {}
        for name, src in student.named_parameters(remove_duplicate=False):
            targets.setdefault(id(own[name]), (src, own[name]))
        self.pairs = list(targets.values())

    @classmethod
    def maybe(cls, student: nn.Module, dtype: torch.dtype | None,
              device: torch.device) -> DecodeCopy | None:
        """A copy on `device` where one is needed (needs_copy)."""
        return cls(student, dtype, device) if needs_copy(student, dtype, device) else None

    @torch.no_grad()
    def refreshed(self) -> nn.Module:
        """The copy, holding the student's current weights."""
        for src, dst in self.pairs:
            dst.copy_(src)
        return self.copy


def needs_copy(student: nn.Module, dtype: torch.dtype | None, device: torch.device) -> bool:
    """Rollouts decode a DecodeCopy when they run on CUDA, a decode dtype is given, the
    student's parameters are in another dtype, and it is not FSDP-sharded (the graph engine
    does not serve sharded modules)."""
    if dtype is None or device.type != "cuda" or is_sharded(student):
        return False
    return any(p.dtype != dtype for p in student.parameters())


def load_rollout_state(checkpoint_dir: Path, rank: int) -> dict[str, Any] | None:
    """This rank's rollout state from a checkpoint (verified by checkpoint.load before)."""
    states = torch.load(Path(checkpoint_dir) / "rng.pt", map_location="cpu", weights_only=True)
    return states[rank].get(STATE_KEY) if rank < len(states) else None


class TopKScores:
    """An online provider whose logits come back as top-k + tail (`teacher_topk`), formed in
    token chunks exactly as the teacher cache forms them."""

    def __init__(self, provider: Any, k: int, vocab: int, chunk_tokens: int) -> None:
        self.provider = provider
        self.k, self.vocab, self.chunk_tokens = k, vocab, chunk_tokens

    def signals(self, batch: dict[str, torch.Tensor]) -> TeacherSignals:
        sig = self.provider.signals(batch)
        h = sig.last_hidden
        assert h is not None and sig.head is not None
        b, n, _ = h.shape
        bias = getattr(sig.head, "bias", None)
        ids, lps, tail = topk_logprobs(h.reshape(b * n, -1), sig.head.weight[:self.vocab],
                                       None if bias is None else bias[:self.vocab],
                                       sig.softcap, self.k, self.chunk_tokens)
        sig.topk = TopKTeacher(ids.view(b, n, -1), lps.view(b, n, -1), tail.view(b, n))
        sig.last_hidden, sig.head = None, None
        return sig


def make_rollouts(mode: nn.Module, student: nn.Module, *, seed: int, rank: int,
                  device: torch.device, eos_token_id: int | None,
                  autocast: Any = nullcontext, decode_dtype: torch.dtype | None = None
                  ) -> RolloutSource | None:
    """The rollout source of a mode that declares one (onpolicy), else None. `decode_dtype`:
    the dtype rollouts decode in on CUDA (the training autocast's; see DecodeCopy)."""
    params = getattr(mode, "rollout", None)
    if params is None:
        return None
    return RolloutSource(params, student, seed=seed, rank=rank, device=device,
                         eos_token_id=eos_token_id, autocast=autocast,
                         decode_dtype=decode_dtype)


class StepPhases:
    """Energy windows of one step: `step`, and inside it one window per phase run, switched
    in order (`switch("score")` closes the open phase window and opens the next; the same
    phase again adds to the open one). Every `every`-th step is metered (0: none)."""

    def __init__(self, meter: Any, every: int = 1) -> None:
        self.meter = meter
        self.every = every
        self._step: int | None = None
        self._open: Any = None

    @contextmanager
    def step(self, step: int, tokens: int) -> Iterator[None]:
        """`step` is the 1-based number of the step being taken."""
        if not self.every or step % self.every:
            yield
            return
        with self.meter.phase("step", step=step) as window:
            self._step = step
            try:
                yield
            except BaseException as exc:
                self._close(type(exc))
                raise
            self._close(None)
            self._step = None
            window.add_tokens(tokens)

    def switch(self, name: str, tokens: int = 0) -> None:
        if self._step is None:
            return
        if self._open is None or self._open.name != name:
            self._close(None)
            self._open = self.meter.phase(name, step=self._step)
            self._open.__enter__()
        self._open.add_tokens(tokens)

    def _close(self, exc_type: Any) -> None:
        if self._open is not None:
            window, self._open = self._open, None
            window.__exit__(exc_type, None, None)


class NoPhases(StepPhases):
    """Off-policy methods: the step is not split."""

    def __init__(self) -> None:
        super().__init__(None, 0)


NO_PHASES = NoPhases()
