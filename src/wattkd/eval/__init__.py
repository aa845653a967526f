"""Evaluation: lm-eval suites with a locked protocol, held-out perplexity, inference EPT.

Heavy imports (lm-eval, transformers) happen inside the functions, so importing this package
is cheap.
"""

from wattkd.eval.ept import EptError, ept_for, ept_from_record, ept_metrics, run_ept
from wattkd.eval.harness import EvalError, evaluate_lm, load_model, run_eval
from wattkd.eval.perplexity import PerplexityError, in_loop_record, perplexity, run_perplexity
from wattkd.eval.protocol import ProtocolMismatch, compare_protocols, protocol_hash
from wattkd.eval.suites import SUITES, Suite, SuiteError, SuiteTask, get_suite

__all__ = [
    "SUITES", "EptError", "EvalError", "PerplexityError", "ProtocolMismatch", "Suite",
    "SuiteError", "SuiteTask", "compare_protocols", "ept_for", "ept_from_record",
    "ept_metrics", "evaluate_lm", "get_suite", "in_loop_record", "load_model", "perplexity",
    "protocol_hash", "run_ept", "run_eval", "run_perplexity",
]
