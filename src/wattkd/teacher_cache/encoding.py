"""Per-row byte encodings of the cached signals: what makes a cache small and still exact enough.

Every array column of a cache part is a Parquet `large_binary` cell per row holding that row's
array; the manifest's `columns` says how to read it. Building blocks:

* byte planes: an unsigned array of n values is stored as its little-endian byte 0 of every
  value, then byte 1 of every value, ...; only the planes a value can use are kept (token ids
  of a 262,144-token vocabulary take 3 planes, not 4). zstd then sees long runs of similar
  bytes (the high planes are nearly constant), which it compresses far better than
  interleaved bytes.
* top-k encodings (positions 0..L-1, K entries each):
  - `raw`     ids int32 and log-probs float32 in rank order, no compression (the reference).
  - `fp16`    ids in the narrowest byte width the vocabulary allows, log-probs float16, both
              in rank order as byte planes, zstd.
  - `packed`  per position the K ids sorted ascending and stored as gaps (first id, then
              differences; small numbers for the frequent low-id tokens), log-probs in the same
              order as uint16 codes round(-logp * scale) (a uniform grid in log space, step
              1/scale nat: every entry has the same relative error in probability), byte
              planes, zstd. Decoded ids come back sorted by id, not by rank: the KD losses do
              not depend on the order of the K entries.
  The tail log-mass (log of the probability outside the K ids) is float32 in every encoding.
* hidden states: fp16 / bf16 bit patterns as two byte planes (`raw`: plain little-endian).
* pooled embeddings: float32 little-endian.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "PACKED_SCALE",
    "TopKArrays",
    "decode_f32",
    "decode_hidden",
    "decode_topk",
    "encode_f32",
    "encode_hidden",
    "encode_topk",
    "from_planes",
    "id_bytes",
    "to_planes",
    "topk_columns",
]

# Log-prob grid of the `packed` encoding: codes per nat (step 1/64 nat = ~1.6% in probability,
# max error half of that). Measured to keep the forward-KL loss within 1e-3 relative of the
# raw cache (benchmarks/RESULTS.md); stored in the manifest, so a reader never assumes it.
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


def from_planes(blobs: list[bytes], n: int, nbytes: int, dtype: np.dtype) -> np.ndarray:
    """Inverse of `to_planes`: blobs of `nbytes` planes of n values -> [rows, n] of `dtype`."""
    dt = np.dtype(dtype).newbyteorder("<")
    rows = len(blobs)
    flat = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    if flat.size != rows * nbytes * n:
        raise ValueError(f"cache cell has {flat.size} bytes, expected {rows * nbytes * n} "
                         f"({rows} rows x {nbytes} planes x {n} values)")
    planes = flat.reshape(rows, nbytes, n)
    out = np.zeros((rows, n, dt.itemsize), dtype=np.uint8)
    out[:, :, :nbytes] = planes.transpose(0, 2, 1)
    return out.view(dt).reshape(rows, n)


# ---------------------------------------------------------------------------------- top-k
@dataclass
class TopKArrays:
    """Decoded top-k of some rows (numpy; the provider turns them into tensors)."""

    ids: np.ndarray        # [n, L, K] int64
    logprobs: np.ndarray   # [n, L, K] float32
    tail: np.ndarray       # [n, L] float32


def topk_columns(encoding: str, seq_len: int, k: int, vocab: int) -> dict[str, dict]:
    """Manifest description of the top-k columns (documentation and reader parameters)."""
    shape = [seq_len, k]
    tail = {"values": "float32", "shape": [seq_len], "codec": "le"}
    if encoding == "raw":
        return {"topk_ids": {"values": "int32", "shape": shape, "codec": "le",
                             "order": "rank"},
                "topk_logprobs": {"values": "float32", "shape": shape, "codec": "le",
                                  "order": "rank"},
                "topk_tail": tail}
    nb = id_bytes(vocab)
    if encoding == "fp16":
        return {"topk_ids": {"values": "uint32", "shape": shape, "codec": "planes",
                             "bytes": nb, "order": "rank"},
                "topk_logprobs": {"values": "float16", "shape": shape, "codec": "planes",
                                  "bytes": 2, "order": "rank"},
                "topk_tail": tail}
    if encoding == "packed":
        return {"topk_ids": {"values": "uint32", "shape": shape, "codec": "planes",
                             "bytes": nb, "order": "id", "transform": "delta"},
                "topk_logprobs": {"values": "uint16", "shape": shape, "codec": "planes",
                                  "bytes": 2, "order": "id",
                                  "transform": "logprob = -code / scale",
                                  "scale": PACKED_SCALE},
                "topk_tail": tail}
    raise ValueError(f"unknown top-k encoding {encoding!r}")


def encode_topk(encoding: str, ids: torch.Tensor, logprobs: torch.Tensor,
                tail: torch.Tensor, vocab: int, scale: float = PACKED_SCALE
                ) -> dict[str, list[bytes]]:
    """Encode [n, L, K] ids / log-probs and [n, L] tail log-mass; sort and quantise run on the
    tensors' device (GPU during a cache build), only the compact result is copied to the host."""
    if torch.isnan(logprobs).any() or torch.isnan(tail).any():
        raise ValueError("teacher log-probs contain NaN: the teacher forward is broken (check "
                         "teacher.dtype; fp16 overflows in some models, use bfloat16)")
    n = ids.shape[0]
    out: dict[str, list[bytes]] = {"topk_tail": encode_f32(tail)}
    if encoding == "raw":
        i32 = ids.to(torch.int32).cpu().numpy().astype("<i4").reshape(n, -1)
        f32 = logprobs.float().cpu().numpy().astype("<f4").reshape(n, -1)
        out["topk_ids"] = [r.tobytes() for r in i32]
        out["topk_logprobs"] = [r.tobytes() for r in f32]
        return out
    nb = id_bytes(vocab)
    if encoding == "fp16":
        out["topk_ids"] = to_planes(ids.to(torch.int32).cpu().numpy().astype(np.uint32)
                                    .reshape(n, -1), nb)
        half = logprobs.to(torch.float16).cpu().numpy().view(np.uint16).reshape(n, -1)
        out["topk_logprobs"] = to_planes(half, 2)
        return out
    if encoding == "packed":
        sorted_ids, order = ids.sort(dim=-1)
        lp = logprobs.float().gather(-1, order)
        gaps = torch.diff(sorted_ids, dim=-1, prepend=torch.zeros_like(sorted_ids[..., :1]))
        codes = torch.round(-lp.clamp(max=0.0) * scale).clamp(0, MAX_CODE)
        out["topk_ids"] = to_planes(gaps.to(torch.int32).cpu().numpy().astype(np.uint32)
                                    .reshape(n, -1), nb)
        out["topk_logprobs"] = to_planes(codes.to(torch.int32).cpu().numpy()
                                         .astype(np.uint16).reshape(n, -1), 2)
        return out
    raise ValueError(f"unknown top-k encoding {encoding!r}")


def decode_topk(encoding: str, columns: dict[str, dict], cells: dict[str, list[bytes]]
                ) -> TopKArrays:
    """Decode the top-k cells of some rows, with the parameters the manifest recorded."""
    ci, cl = columns["topk_ids"], columns["topk_logprobs"]
    seq, k = ci["shape"]
    m = seq * k
    n = len(cells["topk_ids"])
    tail = decode_f32(cells["topk_tail"], seq)
    if encoding == "raw":
        ids = np.frombuffer(b"".join(cells["topk_ids"]), "<i4").astype(np.int64)
        lp = np.frombuffer(b"".join(cells["topk_logprobs"]), "<f4").astype(np.float32)
    elif encoding == "fp16":
        ids = from_planes(cells["topk_ids"], m, ci["bytes"], np.uint32).astype(np.int64)
        lp = from_planes(cells["topk_logprobs"], m, 2, np.uint16).view(np.float16)
        lp = lp.astype(np.float32)
    elif encoding == "packed":
        gaps = from_planes(cells["topk_ids"], m, ci["bytes"], np.uint32)
        ids = np.cumsum(gaps.reshape(n, seq, k).astype(np.int64), axis=-1)
        codes = from_planes(cells["topk_logprobs"], m, 2, np.uint16)
        lp = codes.astype(np.float32) * np.float32(-1.0 / float(cl["scale"]))
    else:
        raise ValueError(f"unknown top-k encoding {encoding!r}")
    return TopKArrays(ids.reshape(n, seq, k), lp.reshape(n, seq, k), tail.reshape(n, seq))


# ------------------------------------------------------------------------ hidden / pooled
def encode_hidden(encoding: str, hidden: torch.Tensor) -> list[bytes]:
    """[n, P, H] fp16/bf16 -> one cell per row (bit patterns; planes unless `raw`)."""
    if hidden.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"hidden states must be fp16 or bf16 here, got {hidden.dtype}")
    n = hidden.shape[0]
    bits = hidden.contiguous().view(torch.int16).cpu().numpy().view(np.uint16).reshape(n, -1)
    if encoding == "raw":
        return [r.astype("<u2").tobytes() for r in bits]
    return to_planes(bits, 2)


def decode_hidden(encoding: str, cells: list[bytes], shape: list[int], dtype: str
                  ) -> torch.Tensor:
    """Cells of some rows -> [n, P, H] tensor of `dtype` (float16 | bfloat16)."""
    n, count = len(cells), int(np.prod(shape))
    if encoding == "raw":
        bits = np.frombuffer(b"".join(cells), "<u2").reshape(n, count)
    else:
        bits = from_planes(cells, count, 2, np.uint16)
    t = torch.from_numpy(bits.view(np.int16).copy())
    return t.view(getattr(torch, dtype)).reshape(n, *shape)


def encode_f32(x: torch.Tensor) -> list[bytes]:
    a = x.float().cpu().numpy().astype("<f4").reshape(x.shape[0], -1)
    return [r.tobytes() for r in a]


def decode_f32(cells: list[bytes], count: int) -> np.ndarray:
    a = np.frombuffer(b"".join(cells), "<f4")
    if a.size != len(cells) * count:
        raise ValueError(f"cache cell has {a.size} values for {len(cells)} rows, expected "
                         f"{count} per row")
    return a.astype(np.float32).reshape(len(cells), count)
