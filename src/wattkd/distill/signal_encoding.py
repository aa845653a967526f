"""Per-row byte encodings of the cached signals: what makes a cache small and still exact enough.

Every array column of a cache part is a Parquet `large_binary` cell per row holding that row's
array; the manifest's `columns` says how to read it. Building blocks:

* byte planes: an unsigned array of n values is stored as its little-endian byte 0 of every
  value, then byte 1 of every value, ...; only the planes a value can use are kept (token ids
  of a 262,144-token vocabulary take 3 planes, not 4). zstd then sees long runs of similar
  bytes (the high planes are nearly constant), which it compresses far better than
  interleaved bytes.
* top-k encodings (positions 0..L-1, K entries each):
  - `raw`     ids int32 and log-probs float32 in rank order, tail float32, no compression:
              the reference the others are measured against.
  - `fp16`    ids in the narrowest byte width the vocabulary allows, log-probs and tail
              float16, byte planes, zstd.
  - `packed`  (default) ids replaced by their *candidate rank* (token ids ordered by how often
              they appear in the teacher's top-k on a calibration sample; `id_order.bin`),
              sorted ascending and stored as gaps: frequent candidates become small, dense
              numbers. Log-probs in the same order on a uniform grid, code = round(-logp *
              scale) (step 1/scale nat, the same relative error in probability for every
              entry), stored as each position's largest code followed by (largest - code):
              small numbers again. Tail float16. Byte planes, zstd. Decoded entries come back
              in candidate-rank order, not probability order: the KD losses do not depend on
              the order of the K entries.
* hidden states: fp16 / bf16 bit patterns as two byte planes (`raw`: plain little-endian).
* pooled embeddings: float32 little-endian.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wattkd.distill.losses import TopKTeacher

TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "topk_tail")
IDS, LOGPROBS, TAIL = TOPK_COLUMNS

__all__ = [
    "PACKED_SCALE",
    "TOPK_COLUMNS",
    "candidate_order",
    "cells_tensor",
    "decode_f32",
    "decode_hidden",
    "decode_topk",
    "id_bytes",
    "planes_to_int",
    "to_planes",
    "topk_columns",
]

# Log-prob grid of the `packed` encoding: codes per nat. Step 1/64 nat: at most 0.8% error in
# any probability. Measured on Gemma 3 270M top-128 (CPU, 2,048 tokens of Austen) against a
# student 0.03 nat from the teacher (the hard case: the error is a bias of ~step^2/24 nat per
# token, so it is relatively largest for a good student): forward/reverse KL within 1.1e-4 /
# 8.5e-5 relative of the raw cache; 1/32 nat gave 1.2e-3. Stored in the manifest.
PACKED_SCALE = 64.0
MAX_CODE = 0xFFFF


def id_bytes(vocab: int) -> int:
    """Bytes per token id: the fewest that hold vocab - 1."""
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    return max(1, ((vocab - 1).bit_length() + 7) // 8)


# ---------------------------------------------------------------------------- byte planes
def to_planes(values: np.ndarray, nbytes: int) -> list[bytes]:
    """[rows, n] unsigned ints -> one blob per row: the low `nbytes` byte planes, plane-major."""
    a = np.ascontiguousarray(values)
    if a.dtype.kind != "u":
        raise TypeError(f"byte planes need an unsigned integer array, got {a.dtype}")
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    rows, n = a.shape
    b = a.view(np.uint8).reshape(rows, n, a.dtype.itemsize)[:, :, :nbytes]
    planes = np.ascontiguousarray(b.transpose(0, 2, 1))  # [rows, nbytes, n]
    return [planes[i].tobytes() for i in range(rows)]


def cells_tensor(cells: list[bytes], device: torch.device | str = "cpu") -> torch.Tensor:
    """Cells of some rows -> one uint8 tensor [rows, bytes] on `device` (decoding then runs
    there: on a GPU only the compact bytes cross PCIe, and the unpacking is a few kernels)."""
    if len({len(c) for c in cells}) > 1:
        raise ValueError("cache cells of one column differ in size; the part is corrupt")
    t = torch.frombuffer(bytearray(b"".join(cells)), dtype=torch.uint8)
    device = torch.device(device)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.view(len(cells), -1)


def planes_to_int(t: torch.Tensor, n: int, nbytes: int) -> torch.Tensor:
    """Inverse of `to_planes` on a device: [rows, nbytes * n] uint8 -> [rows, n] int32
    (nbytes <= 3, so every value fits)."""
    rows = t.shape[0]
    if t.shape[1] != nbytes * n or nbytes > 3:
        raise ValueError(f"cache cell has {t.shape[1]} bytes, expected {nbytes * n} "
                         f"({nbytes} planes x {n} values)")
    p = t.view(rows, nbytes, n).to(torch.int32)
    v = p[:, 0]
    for b in range(1, nbytes):
        v = v | (p[:, b] << (8 * b))
    return v


def _bits16(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 holding 16-bit patterns -> float16 / bfloat16 with those bits."""
    return torch.where(v >= 32768, v - 65536, v).to(torch.int16).view(dtype)


# ---------------------------------------------------------------------------------- top-k
def topk_columns(encoding: str, seq_len: int, k: int, vocab: int) -> dict[str, dict]:
    """Manifest description of the top-k columns (documentation and reader parameters)."""
    shape = [seq_len, k]
    if encoding == "raw":
        return {IDS: {"values": "int32", "shape": shape, "codec": "le",
                             "order": "rank"},
                LOGPROBS: {"values": "float32", "shape": shape, "codec": "le",
                                  "order": "rank"},
                TAIL: {"values": "float32", "shape": [seq_len], "codec": "le"}}
    nb = id_bytes(vocab)
    tail = {"values": "float16", "shape": [seq_len], "codec": "planes", "bytes": 2}
    if encoding == "fp16":
        return {IDS: {"values": "uint32", "shape": shape, "codec": "planes",
                             "bytes": nb, "order": "rank"},
                LOGPROBS: {"values": "float16", "shape": shape, "codec": "planes",
                                  "bytes": 2, "order": "rank"},
                TAIL: tail}
    if encoding == "packed":
        return {IDS: {"values": "uint32", "shape": shape, "codec": "planes",
                             "bytes": nb, "order": "ascending candidate rank",
                             "transform": "id -> rank (id_order), sort, delta"},
                LOGPROBS: {"values": "uint16", "shape": [seq_len + seq_len * k],
                                  "codec": "planes", "bytes": 2,
                                  "order": "as topk_ids",
                                  "transform": "code = round(-logp * scale); stored: L "
                                               "per-position max codes, then max - code",
                                  "scale": PACKED_SCALE},
                TAIL: tail}
    raise ValueError(f"unknown top-k encoding {encoding!r}")


@dataclass
class Staged:
    """A column of some rows, on the host, before it is cut into per-row cells.

    The device work of encoding (sort, quantise, copy to host) happens when a Staged is made;
    cutting it into bytes (`cells`) is pure host work a cache build does in its writer thread,
    overlapping the teacher's next batch. `nbytes`: byte planes kept; None: plain bytes.
    """

    values: np.ndarray        # [rows, n]
    nbytes: int | None = None

    def cells(self) -> list[bytes]:
        if self.nbytes is None:
            v = self.values.astype(self.values.dtype.newbyteorder("<"), copy=False)
            return [r.tobytes() for r in v]
        return to_planes(self.values, self.nbytes)


def stage_topk(encoding: str, ids: torch.Tensor, logprobs: torch.Tensor,
               tail: torch.Tensor, vocab: int, scale: float = PACKED_SCALE,
               id_rank: torch.Tensor | None = None) -> dict[str, Staged]:
    """Encode [n, L, K] ids / log-probs and [n, L] tail log-mass up to host arrays. Sorting
    and quantisation run on the tensors' device; only the compact result is copied.

    `id_rank` [vocab] (packed only): candidate rank of every token id (see `candidate_order`);
    ids are stored as ranks, which puts the tokens that are often in a top-k at small numbers.
    """
    if torch.isnan(logprobs).any() or torch.isnan(tail).any():
        raise ValueError("teacher log-probs contain NaN: the teacher forward is broken (check "
                         "teacher.dtype; fp16 overflows in some models, use bfloat16)")
    n = ids.shape[0]
    if encoding == "raw":
        return {IDS: Staged(ids.to(torch.int32).cpu().numpy().reshape(n, -1)),
                LOGPROBS: Staged(logprobs.float().cpu().numpy().reshape(n, -1)),
                TAIL: Staged(tail.float().cpu().numpy().reshape(n, -1))}
    nb = id_bytes(vocab)
    out = {TAIL: Staged(_half_bits(tail.reshape(n, -1)), 2)}
    if encoding == "fp16":
        out[IDS] = Staged(ids.to(torch.int32).cpu().numpy().astype(np.uint32)
                                 .reshape(n, -1), nb)
        out[LOGPROBS] = Staged(_half_bits(logprobs.reshape(n, -1)), 2)
        return out
    if encoding == "packed":
        keys = ids if id_rank is None else id_rank.to(ids.device)[ids]
        sorted_keys, order = keys.sort(dim=-1)
        lp = logprobs.float().gather(-1, order)
        gaps = torch.diff(sorted_keys, dim=-1, prepend=torch.zeros_like(sorted_keys[..., :1]))
        codes = torch.round(-lp.clamp(max=0.0) * scale).clamp(0, MAX_CODE).to(torch.int32)
        top = codes.max(dim=-1).values                                  # [n, L]
        packed = torch.cat([top, (top[..., None] - codes).flatten(1)], dim=1)
        out[IDS] = Staged(gaps.to(torch.int32).cpu().numpy().astype(np.uint32)
                                 .reshape(n, -1), nb)
        out[LOGPROBS] = Staged(packed.cpu().numpy().astype(np.uint16), 2)
        return out
    raise ValueError(f"unknown top-k encoding {encoding!r}")


def decode_topk(encoding: str, columns: dict[str, dict], cells: dict[str, list[bytes]],
                id_order: torch.Tensor | None = None, device: torch.device | str = "cpu"
                ) -> TopKTeacher:
    """Decode the top-k cells of some rows on `device`, with the manifest's parameters
    (ids [n, L, K] int64, log-probs [n, L, K] and tail [n, L] float32).
    `id_order` [vocab]: token id of each candidate rank (packed caches have one)."""
    ci, cl = columns[IDS], columns[LOGPROBS]
    seq, k = ci["shape"]
    m = seq * k
    n = len(cells[IDS])
    raw_ids = cells_tensor(cells[IDS], device)
    raw_lp = cells_tensor(cells[LOGPROBS], device)
    raw_tail = cells_tensor(cells[TAIL], device)
    if encoding == "raw":
        ids = raw_ids.view(torch.int32).long()
        lp = raw_lp.view(torch.float32)
        tail = raw_tail.view(torch.float32)
    elif encoding == "fp16":
        ids = planes_to_int(raw_ids, m, ci["bytes"]).long()
        lp = _bits16(planes_to_int(raw_lp, m, 2), torch.float16).float()
        tail = _bits16(planes_to_int(raw_tail, seq, 2), torch.float16).float()
    elif encoding == "packed":
        gaps = planes_to_int(raw_ids, m, ci["bytes"]).view(n, seq, k)
        ids = torch.cumsum(gaps, dim=-1, dtype=torch.int64)
        if id_order is not None:
            ids = id_order.to(ids.device)[ids]
        a = planes_to_int(raw_lp, seq + m, 2)
        codes = a[:, :seq, None] - a[:, seq:].view(n, seq, k)
        lp = codes.float() * (-1.0 / float(cl["scale"]))
        tail = _bits16(planes_to_int(raw_tail, seq, 2), torch.float16).float()
    else:
        raise ValueError(f"unknown top-k encoding {encoding!r}")
    return TopKTeacher(ids.reshape(n, seq, k), lp.reshape(n, seq, k), tail.reshape(n, seq))


def candidate_order(ids: torch.Tensor, vocab: int) -> np.ndarray:
    """Token ids ordered by how often they occur in the given top-k sets (ties: by id).

    Computed once per cache from a calibration sample, it turns the ids of each top-k set into
    small, clustered numbers (frequent candidates first), so their gaps compress far better
    than raw ids: Gemma 3 270M top-128 ids (262k vocabulary) from 9.3 to 7.0 bits each, with
    the order taken from 1,024 other tokens.
    """
    counts = torch.bincount(ids.reshape(-1).long().cpu(), minlength=vocab)[:vocab]
    order = torch.argsort(-counts, stable=True)
    return order.numpy().astype(np.int64)


def _half_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).contiguous().cpu().numpy().view(np.uint16)


# ------------------------------------------------------------------------ hidden / pooled
def stage_hidden(encoding: str, hidden: torch.Tensor) -> Staged:
    """[n, P, H] fp16/bf16 -> bit patterns on the host (planes unless `raw`)."""
    if hidden.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"hidden states must be fp16 or bf16 here, got {hidden.dtype}")
    n = hidden.shape[0]
    bits = hidden.contiguous().view(torch.int16).cpu().numpy().view(np.uint16).reshape(n, -1)
    return Staged(bits, None if encoding == "raw" else 2)


def decode_hidden(encoding: str, cells: list[bytes], shape: list[int], dtype: str,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Cells of some rows -> [n, P, H] tensor of `dtype` (float16 | bfloat16) on `device`."""
    n, count = len(cells), int(np.prod(shape))
    t = cells_tensor(cells, device)
    if encoding == "raw":
        out = t.view(torch.int16).view(getattr(torch, dtype))
    else:
        out = _bits16(planes_to_int(t, count, 2), getattr(torch, dtype))
    return out.reshape(n, *shape)


def stage_f32(x: torch.Tensor) -> Staged:
    return Staged(x.float().cpu().numpy().reshape(x.shape[0], -1))


def decode_f32(cells: list[bytes], count: int, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
    t = cells_tensor(cells, device)
    if t.shape[1] != 4 * count:
        raise ValueError(f"cache cell has {t.shape[1]} bytes, expected {4 * count}")
    return t.view(torch.float32).reshape(len(cells), count)
