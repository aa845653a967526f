"""Tokens a killed training session ran, from the steps it logged to metrics.jsonl.

A `train` window whose session was killed has tokens only up to its last progress record
(a checkpoint, or the progress timer); the steps after it ran too, and used energy that the
recovered window counts. What is knowable: every completed step writes a metrics.jsonl line
(`kind: step` or `train`) as it finishes, and a resumed session re-logs from its checkpoint
step + 1, so the file splits into one block of increasing steps per session. A killed session
ran (its last logged step - its `start_step`) x tokens per step (`train` records: cumulative
tokens / step) tokens: the tokens of the steps it completed, repeats after a resume included
("run", not "unique"); a step the kill cut short is not counted. Where the blocks cannot be
told apart (two sessions from one checkpoint, one of which logged nothing), the progress count
stays, with a note.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STEP_KINDS = ("step", "train", "eval")


def _step_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a cut line: the step it was writing did not complete
        if isinstance(obj, dict) and obj.get("kind") in STEP_KINDS \
                and isinstance(obj.get("step"), int) and not isinstance(obj["step"], bool):
            out.append(obj)
    return out


def _blocks(recs: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """(first step, last step) of each run of increasing steps (one per session): a step
    logged again (not an `eval` of the step just logged, nor the `final` train record of a
    step that stopped the run) starts the next session's block."""
    blocks: list[list[int]] = []
    for r in recs:
        step = r["step"]
        same_step = r["kind"] == "eval" or (r["kind"] == "train" and r.get("final") is True)
        again = step < blocks[-1][1] or (step == blocks[-1][1] and not same_step) \
            if blocks else True
        if again:
            blocks.append([step, step])
        else:
            blocks[-1][1] = step
    return [(a, b) for a, b in blocks]


def tokens_per_step(recs: Sequence[dict[str, Any]]) -> int | None:
    """Global tokens per optimizer step, from the cumulative counts of `train` records
    (None unless every record agrees)."""
    rates = {r["tokens"] / r["step"] for r in recs if r.get("kind") == "train"
             and isinstance(r.get("tokens"), int) and r["step"] > 0}
    if len(rates) != 1:
        return None
    rate = rates.pop()
    return int(rate) if float(rate).is_integer() and rate > 0 else None


def _sessions(objs: Sequence[dict[str, Any]]) -> list[tuple[tuple[Any, Any], int]]:
    """((host, session), start step) of each train window's begin, in file order; the begins
    of one multi-node session (same start step, other hosts, within a minute) count once."""
    out: list[tuple[tuple[Any, Any], int]] = []
    last: dict[str, Any] | None = None
    for o in objs:
        start = (o.get("meta") or {}).get("start_step")
        if o.get("kind") != "begin" or o.get("phase") != "train" \
                or o.get("window", "phase") != "phase" or not isinstance(start, int):
            continue
        same = (last is not None and (last.get("meta") or {}).get("start_step") == start
                and last.get("host") != o.get("host")
                and abs(float(last.get("start_wall", 0)) - float(o.get("start_wall", 0))) < 60)
        if not same:
            out.append(((o.get("host"), o.get("session")), start))
        last = o
    return out


def _last_steps(sessions: list[tuple[tuple[Any, Any], int]],
                blocks: list[tuple[int, int]]) -> dict[int, int | None]:
    """Session index -> the last step it logged (None: cannot be told)."""
    out: dict[int, int | None] = {}
    used = 0
    for i, (_, s0) in enumerate(sessions):
        same_start = sum(1 for _, s in sessions if s == s0)
        starting = sum(1 for a, _ in blocks if a == s0 + 1)
        if same_start != starting:
            out[i] = None
            continue
        j = next((j for j in range(used, len(blocks)) if blocks[j][0] == s0 + 1), None)
        if j is None:
            out[i] = None
            continue
        used = j + 1
        last = blocks[j][1]
        if i + 1 < len(sessions):  # the next session's steps merged into this block
            nxt = sessions[i + 1][1]
            if s0 <= nxt < last and not any(a == nxt + 1 for a, _ in blocks[used:]):
                last = nxt
        out[i] = last
    return out


def count_killed_tokens(metrics: Path, objs: Sequence[dict[str, Any]],
                        recovered: Sequence[dict[str, Any]]) -> None:
    """Raise the tokens of recovered `train` windows (and their sessions' `run` windows) to
    the steps their sessions logged (module docstring); in place, noted on each record."""
    trains = [r for r in recovered if r.get("kind") == "phase" and r.get("phase") == "train"]
    if not trains or not metrics.is_file():
        return
    try:
        recs = _step_records(metrics)
    except OSError as exc:
        log.warning("%s unreadable: tokens of killed sessions stay at their last progress "
                    "record (%s)", metrics, exc)
        return
    tps = tokens_per_step(recs)
    if tps is None:
        return
    sessions = _sessions(objs)
    last = _last_steps(sessions, _blocks(recs))
    index = {key: i for i, (key, _) in enumerate(sessions)}
    for rec in trains:
        i = index.get((rec.get("host"), rec.get("session")))
        if i is None:
            continue
        s0 = sessions[i][1]
        if last.get(i) is None:
            rec["notes"].append("tokens count to the last progress record: this session's "
                                "steps cannot be told apart from another's in metrics.jsonl")
            continue
        steps = int(last[i]) - s0  # type: ignore[arg-type]
        tokens = steps * tps
        if tokens <= int(rec.get("tokens", 0)):
            continue
        delta = tokens - int(rec.get("tokens", 0))
        rec["tokens"] = tokens
        rec["recovered"]["tokens_from"] = (f"metrics.jsonl: steps {s0 + 1}..{last[i]} logged "
                                           f"x {tps} tokens per step")
        rec["notes"].append(f"tokens: the {steps} steps this session logged to metrics.jsonl "
                            f"before it died (steps {s0 + 1}..{last[i]}, {tps} tokens each), "
                            "not only those up to its last progress record")
        for run in recovered:
            if run.get("kind") == "run" and run.get("session") == rec.get("session") \
                    and run.get("host") == rec.get("host"):
                run["tokens"] = int(run.get("tokens", 0)) + delta
