"""The teacher farm: run a teacher once, cache its signals, distil many students from them.

    build_cache(cfg, "topk,hidden:2:4,pooled") -> cache folder   (`wattkd teacher cache`)
    check_cache(cfg, shards_path)                                 refuse a mismatched cache
    CachedTeacher(cfg, request, rank=r, world_size=w).signals(batch) -> TeacherSignals

Modules: spec (what is cached), plan (checks + layout before loading weights), compute
(teacher forward -> signals); what each signal kind stores and how it is encoded is the kind's
(distill/signals.py, distill/signal_encoding.py); manifest (format + identity), writer
(resumable build), reader (random rows for training),
build_energy (what the build cost). Who shares that cost: wattkd.amortisation.
"""

from wattkd.teacher_cache.manifest import CacheError, read_cache_manifest
from wattkd.teacher_cache.plan import plan_cache
from wattkd.teacher_cache.reader import CachedTeacher, CacheReader, check_cache
from wattkd.teacher_cache.spec import CacheSpec, SpecError, parse_signals
from wattkd.teacher_cache.writer import build_cache

__all__ = [
           "CacheError",
           "CacheReader",
           "CacheSpec",
           "CachedTeacher",
           "SpecError",
           "build_cache",
           "check_cache",
           "parse_signals",
           "plan_cache",
           "read_cache_manifest",
]
