"""Task accuracy during training (`eval.train_suite` every `train.eval_every` steps).

The suite is resolved and its tasks loaded once, before training starts (a bad suite fails
before any model is built); each call scores the student in memory with lm-eval and returns
the fields the trainer adds to its `kind: eval` record, so quality-vs-joules curves can be
task accuracy, not only held-out loss.
"""

from __future__ import annotations

import logging
from typing import Any

from wattkd.config import EvalConfig
from wattkd.eval.custom import resolve_suite
from wattkd.eval.harness import evaluate_lm, load_tasks, make_lm
from wattkd.eval.suites import SuiteError

log = logging.getLogger(__name__)


class TaskEvaluator:
    """`evaluator(model, tokenizer) -> {"suite", "protocol_hash", "tasks": {name: score}}`."""

    def __init__(self, ev: EvalConfig) -> None:
        assert ev.train_suite is not None
        self.ev = ev
        self.suite = resolve_suite(ev.train_suite, ev)
        self.tasks = load_tasks(self.suite, ev)

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            res = evaluate_lm(make_lm(model, tokenizer, self.ev), self.suite, self.ev,
                              tasks=self.tasks)
        finally:
            model.train(was_training)
        return {"suite": self.suite.name, "protocol_hash": res["protocol_hash"],
                "tasks": {k: v["value"] for k, v in res["scores"].items()}}


def task_evaluator(ev: EvalConfig, *, eval_every: int, strategy: str) -> TaskEvaluator | None:
    """The in-training evaluator when `eval.train_suite` and `train.eval_every` are set."""
    if ev.train_suite is None or not eval_every:
        return None
    if strategy == "fsdp":
        raise SuiteError("eval.train_suite runs lm-eval on one process, which a sharded (fsdp) "
                         "student cannot do; use train.strategy ddp or leave eval.train_suite "
                         "unset (held-out loss is still logged)")
    evaluator = TaskEvaluator(ev)
    log.info("in-training eval: suite %s every %d steps", evaluator.suite.name, eval_every)
    return evaluator
