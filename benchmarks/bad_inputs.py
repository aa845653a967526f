"""The bad inputs of issues 21 and 26, tried as a user would: `wattkd` CLI runs on a tiny
experiment.

    python benchmarks/bad_inputs.py [--flips 300]

Each case damages one thing (a shard part, a cache part, a checkpoint file, a config, a teacher
folder, the disk), runs the CLI command a user would run in a fresh process, and records the
exit code, the `error:` line, whether it names the file/key (the wording check), whether a
traceback leaked, and for recoverable cases whether the run recovered (completed, from which
checkpoint). Then random single-byte flips (seeded) through the same readers: shard parts,
cache parts, checkpoints, counting how many are detected. Writes
benchmarks/results/bad_inputs.json and prints the markdown table for RESULTS.md.
Small tmpfs mounts (full disk, read-only) need root; without it those cases are skipped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
TEACHER = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 64, "tie_word_embeddings": True}
METHODS = [
    {"name": "response", "method": "response", "losses": [{"name": "forward_kl"}]},
    {"name": "feature", "method": "feature", "layer_map": [[1, 2]],
     "losses": [{"name": "hidden_mse"}]},
    {"name": "relation", "method": "relation",
     "losses": [{"name": "rkd_distance"}, {"name": "rkd_angle"}]},
    {"name": "baseline", "method": "none", "losses": [{"name": "ce"}]},
]


def experiment(root: Path, out: str, **train: Any) -> dict:
    return {
        "name": "bad", "output_dir": str(root / out),
        "data": {"tokenizer": "bundled:bpe-4096", "seq_len": 32, "total_tokens": 4096,
                 "shards_dir": str(root / "shards"), "rows_per_part": 32,
                 "heldout_fraction": 0.0},
        "teacher": {"model": str(root / "teacher")},
        "student": {"build": {**TEACHER, "hidden_size": 16, "intermediate_size": 32}},
        "distill": {"methods": METHODS, "cache_top_k": 8, "cache_dir": str(root / "cache")},
        "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "log_every": 2,
                  "checkpoint_every": 2, "keep_last": 3, "eval_every": 0,
                  "tensorboard": False, "device": "cpu", **train},
        "telemetry": {"idle_seconds": 0},
    }


class Runner:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows: list[dict[str, Any]] = []
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"}

    def config(self, data: dict, name: str) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "wattkd.cli", *args], capture_output=True,
                              text=True, env=self.env, cwd=self.root, timeout=600, check=False)

    def case(self, name: str, res: subprocess.CompletedProcess, *, names: str,
             recovered: bool | None = None, expect_code: int | None = None,
             extra: str = "") -> None:
        out = res.stdout + res.stderr
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        line = errors[-1] if errors else ""
        row = {"case": name, "exit_code": res.returncode,
               "detected": bool(line) or recovered is True,
               "error": line[:400], "names": names,
               # log lines are wrapped at the terminal width: compare with spaces collapsed
               "wording_ok": (names in line) if line else (names in " ".join(out.split())),
               "traceback": "Traceback" in out, "recovered": recovered,
               "code_ok": expect_code is None or res.returncode == expect_code,
               "note": extra}
        self.rows.append(row)
        print(f"[{res.returncode:3d}] {name}: {line[:160] or extra}", flush=True)


def tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    return os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True,
        check=False).returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def flip(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def issue26_cases(r: Runner, tmp: Path) -> None:
    """Issue 26's bad inputs: each must be refused before training with one `error:` line."""
    from wattkd.data.tokenizer import load_tokenizer
    from wattkd.models import build_from_config

    def save_model(folder: Path, conf: dict) -> Path:
        build_from_config(conf, 4096, seed=0).save_pretrained(folder)
        load_tokenizer("bundled:bpe-4096").save_pretrained(folder)
        return folder

    # a second train: section (and a key typed twice)
    text = yaml.safe_dump(experiment(tmp, "dup")) + "train:\n  max_steps: 500\n"
    (tmp / "dup.yaml").write_text(text)
    first = 1 + next(i for i, line in enumerate(text.splitlines()) if line == "train:")
    r.case("YAML: a second train: section", r.cli("train", str(tmp / "dup.yaml"), "--method",
                                                   "baseline"),
           names=f"'train' at lines {first} and {len(text.splitlines()) - 1}", expect_code=2)
    # monitor --output that cannot be written
    (tmp / "plainfile").write_text("x")
    for label, out in (("/proc file", "/proc/version"),
                       ("path under a regular file", str(tmp / "plainfile" / "t.jsonl"))):
        r.case(f"monitor --output: {label}", r.cli("monitor", "--output", out, "--duration",
                                                   "1"),
               names=f"--output {out} cannot be written", expect_code=6)
    # output_dir: ~/x
    home = tmp / "home"
    home.mkdir()
    data = experiment(tmp, "tilde")
    data["output_dir"] = "~/x"
    cache = os.environ.get("WATTKD_CACHE") or str(Path.home() / ".cache" / "wattkd")
    res = subprocess.run([sys.executable, "-m", "wattkd.cli", "train",
                          str(r.config(data, "tilde")), "--method", "baseline", "--set",
                          "train.max_steps=1", "--set", "train.checkpoint_every=0"],
                         capture_output=True, text=True,
                         env={**r.env, "HOME": str(home), "WATTKD_CACHE": cache},
                         cwd=tmp, timeout=600, check=False)
    ok = (home / "x" / "baseline" / "rep0" / "final").is_dir() and not (tmp / "~").exists()
    r.case("output_dir: ~/x", res, names=str(home / "x"), recovered=ok,
           extra=f"run under $HOME/x: {ok}; literal ./~ made: {(tmp / '~').exists()}")
    # train.device=cuda without CUDA
    c = r.config(experiment(tmp, "cuda"), "cuda")
    r.case("train.device=cuda on a machine without CUDA",
           r.cli("train", str(c), "--method", "baseline", "--set", "train.device=cuda"),
           names="train.device is 'cuda' but there is no CUDA device", expect_code=2)
    # seq_len above max positions: student and teacher
    data = experiment(tmp, "spos")
    data["student"] = {"build": {**TEACHER, "hidden_size": 16, "intermediate_size": 32,
                                 "max_position_embeddings": 16}}
    r.case("seq_len 32 > student max_position_embeddings 16",
           r.cli("train", str(r.config(data, "spos")), "--method", "baseline"),
           names="at most 16 positions", expect_code=4)
    data = experiment(tmp, "tpos")
    data["teacher"] = {"model": str(save_model(tmp / "teacher16", {
        **TEACHER, "max_position_embeddings": 16}))}
    r.case("seq_len 32 > teacher max_position_embeddings 16",
           r.cli("train", str(r.config(data, "tpos")), "--method", "response"),
           names="at most 16 positions", expect_code=4)
    # train.max_tokens below one step
    r.case("train.max_tokens 100 < one step (128 tokens)",
           r.cli("train", str(r.config(experiment(tmp, "mt", max_steps=None, max_tokens=100),
                                       "mt")), "--method", "baseline"),
           names="less than one optimizer step, which trains 128 tokens", expect_code=2)
    # a student folder whose tokenizer maps two ids the other way round
    student = save_model(tmp / "student-swapped", {**TEACHER, "hidden_size": 16,
                                                   "intermediate_size": 32})
    tok = json.loads((student / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (student / "tokenizer.json").write_text(json.dumps(tok))
    data = experiment(tmp, "stok")
    data["student"] = {"model": str(student)}
    r.case("student folder tokenizer with two ids swapped",
           r.cli("train", str(r.config(data, "stok")), "--method", "baseline"),
           names="tokenizer mismatch: the student folder", expect_code=4)
    # teacher model.safetensors cut in half
    shutil.copytree(tmp / "teacher", tmp / "teacher-cut")
    w = tmp / "teacher-cut" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    data = experiment(tmp, "cut")
    data["teacher"] = {"model": str(tmp / "teacher-cut")}
    r.case("teacher model.safetensors cut in half",
           r.cli("train", str(r.config(data, "cut")), "--method", "response"),
           names=f"{w} is cut short", expect_code=4)
    # one 0xff byte in a .txt corpus
    raw = ("\n".join(f"line {i} of an ordinary document" for i in range(50)) + "\n").encode()
    pos = raw.index(b"line 30 ")
    (tmp / "corpus.txt").write_bytes(raw[:pos] + b"\xff" + raw[pos + 1:])
    data = experiment(tmp, "utf8")
    data["data"].update(sources=[{"path": str(tmp / "corpus.txt")}],
                        shards_dir=str(tmp / "utf8-shards"))
    r.case("one 0xff byte in a .txt corpus (data build)",
           r.cli("data", "build", str(r.config(data, "utf8"))),
           names=f"byte 0xff at offset {pos:,} (line 31)", expect_code=3)
    # eval of a path that does not exist
    r.case("wattkd eval /abs/path/that/does/not/exist",
           r.cli("eval", "/abs/path/that/does/not/exist", "--suite", "offline"),
           names="no such folder /abs/path/that/does/not/exist", expect_code=4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flips", type=int, default=300, help="byte flips per file kind")
    args = ap.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq

    from wattkd import checkpoint
    from wattkd.config import validate
    from wattkd.data.loader import ShardDataset
    from wattkd.data.manifest import ManifestError
    from wattkd.data.shards import build_shards
    from wattkd.data.tokenizer import load_tokenizer
    from wattkd.hashing import file_sha256
    from wattkd.jobs import student_job
    from wattkd.models import build_from_config
    from wattkd.teacher_cache import CacheError, CacheReader, build_cache
    from wattkd.train import train

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="wattkd-bad-"))
    r = Runner(tmp)
    try:
        cfg = validate(experiment(tmp, "base"))
        build_shards(cfg.data, cfg.shards_dir, progress=False)
        build_from_config(TEACHER, 4096, seed=0).save_pretrained(tmp / "teacher")
        load_tokenizer("bundled:bpe-4096").save_pretrained(tmp / "teacher")
        build_cache(cfg, "topk:8,hidden:2,pooled", progress=False)
        base = train(student_job(cfg, "response"), progress=False).run_dir
        shards = cfg.shards_dir / "train"

        def shards_copy(name: str) -> tuple[dict, Path]:
            data = experiment(tmp, name)
            data["data"]["shards_dir"] = str(tmp / f"{name}-shards")
            shutil.copytree(cfg.shards_dir, tmp / f"{name}-shards")
            return data, tmp / f"{name}-shards" / "train"

        # 1. byte flipped mid-part, same size
        data, sh = shards_copy("flip")
        p = sh / "part-00001.parquet"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x10
        p.write_bytes(bytes(b))
        r.case("shard part: 1 byte flipped mid-file (same size)",
               r.cli("train", str(r.config(data, "flip")), "--method", "baseline"),
               names="part-00001.parquet", expect_code=3)
        # 2. out-of-range token id with a re-recorded sha256
        data, sh = shards_copy("oov")
        p = sh / "part-00001.parquet"
        table = pq.read_table(p)
        ids = table["input_ids"].to_pylist()
        ids[5][7] = 5000
        pq.write_table(table.set_column(0, "input_ids", pa.array(ids, table.schema.field(0)
                                                                 .type)), p)
        m = json.loads((sh / "manifest.json").read_text())
        m["parts"][1].update(bytes=p.stat().st_size, sha256=file_sha256(p))
        (sh / "manifest.json").write_text(json.dumps(m, indent=2))
        r.case("shard part: token id 5000 >= vocab 4096 (sha256 re-recorded)",
               r.cli("train", str(r.config(data, "oov")), "--method", "baseline"),
               names="row 5 (global row 37)", expect_code=3)
        # 3. shard manifest of an unknown version
        data, sh = shards_copy("mver")
        m = json.loads((sh / "manifest.json").read_text())
        m["version"] = 9
        (sh / "manifest.json").write_text(json.dumps(m))
        r.case("shard manifest: unknown version (ManifestError)",
               r.cli("train", str(r.config(data, "mver")), "--method", "baseline"),
               names="manifest.json", expect_code=3)
        # 4. cache part flipped, training from the cache
        data = experiment(tmp, "cflip")
        data["distill"]["teacher_signals"] = "cache"
        data["distill"]["cache_dir"] = str(tmp / "cflip-cache")
        shutil.copytree(cfg.cache_dir, tmp / "cflip-cache")
        p = tmp / "cflip-cache" / "part-00002.parquet"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x01
        p.write_bytes(bytes(b))
        r.case("teacher cache part: 1 byte flipped (train from cache)",
               r.cli("train", str(r.config(data, "cflip")), "--method", "response"),
               names="part-00002.parquet", expect_code=3)
        # 5. teacher vocab 8192 vs tokenizer 4096, no tokenizer files
        build_from_config(TEACHER, 8192, seed=0).save_pretrained(tmp / "teacher8192")
        data = experiment(tmp, "vocab")
        data["teacher"] = {"model": str(tmp / "teacher8192")}
        r.case("teacher vocab 8192, tokenizer 4096, no tokenizer beside it",
               r.cli("train", str(r.config(data, "vocab")), "--method", "response"),
               names="nothing shows the 4096 extra rows are padding", expect_code=4)
        # 6. teacher path missing (train and teacher cache)
        data = experiment(tmp, "noteacher")
        data["teacher"] = {"model": str(tmp / "no" / "such" / "teacher")}
        c = r.config(data, "noteacher")
        r.case("teacher path does not exist (train)",
               r.cli("train", str(c), "--method", "response"),
               names=f"no such folder {tmp}/no/such/teacher", expect_code=4)
        r.case("teacher path does not exist (teacher cache)",
               r.cli("teacher", "cache", str(c)),
               names=f"no such folder {tmp}/no/such/teacher", expect_code=4)
        # 7. layer_map past the teacher's layers
        data = experiment(tmp, "lmap")
        data["distill"]["methods"][1]["layer_map"] = [[1, 7]]
        res = r.cli("train", str(r.config(data, "lmap")), "--method", "feature")
        r.case("layer_map teacher layer 7 of 2", res, names="layer_map pair (1, 7)",
               expect_code=4, extra=f"rep0 left behind: {(tmp / 'lmap').exists()}")
        # 8. relation with micro_batch_size 2 (rkd_angle needs 3)
        data = experiment(tmp, "rel", micro_batch_size=2)
        res = r.cli("train", str(r.config(data, "rel")), "--method", "relation")
        r.case("relation (rkd_angle) with micro_batch_size 2", res,
               names="train.micro_batch_size", expect_code=2,
               extra=f"rep0 left behind: {(tmp / 'rel').exists()}")
        # 9. edited vocab_size in the teacher's config.json
        shutil.copytree(tmp / "teacher", tmp / "teacher-edited")
        conf = json.loads((tmp / "teacher-edited" / "config.json").read_text())
        conf["vocab_size"] = 5000
        (tmp / "teacher-edited" / "config.json").write_text(json.dumps(conf))
        data = experiment(tmp, "edited")
        data["teacher"] = {"model": str(tmp / "teacher-edited")}
        r.case("teacher config.json vocab_size edited to 5000",
               r.cli("train", str(r.config(data, "edited")), "--method", "response"),
               names="config.json says vocab_size 5000", expect_code=4)
        # 10. --repeat -1
        res = r.cli("train", str(r.config(experiment(tmp, "neg"), "neg")), "--method",
                    "baseline", "--repeat", "-1")
        r.case("--repeat -1", res, names="--repeat -1", expect_code=2,
               extra=f"rep-1 left behind: {(tmp / 'neg' / 'baseline' / 'rep-1').exists()}")

        issue26_cases(r, tmp)

        # checkpoint cases: a copy of the finished run, final/ removed so it resumes
        def run_copy(name: str, steps: int = 6) -> tuple[Path, Path]:
            run = tmp / name / "response" / "rep0"
            shutil.copytree(base, run)
            shutil.rmtree(run / "final")
            return run, r.config(experiment(tmp, name, max_steps=steps), name)

        for label, fname, how in (("empty model.pt in the newest checkpoint", "model.pt",
                                   "empty"),
                                  ("truncated state.json in the newest checkpoint",
                                   "state.json", "half"),
                                  ("truncated rng.pt in the newest checkpoint", "rng.pt",
                                   "half")):
            run, c = run_copy(f"ck-{fname}")
            f = run / "checkpoints" / "step_0000004" / fname
            raw = f.read_bytes()
            f.write_bytes(b"" if how == "empty" else raw[: len(raw) // 2])
            res = r.cli("train", str(c), "--method", "response")
            info = json.loads((run / "run.json").read_text())
            ok = info.get("status") == "completed" and str(info.get("resumed_from", "")
                                                           ).endswith("step_0000002")
            r.case(label, res, names=fname, recovered=ok,
                   extra="resumed from step_0000002, skip warning names the file"
                   if ok and "skipping checkpoint step_0000004" in res.stderr + res.stdout
                   else "")
        # every checkpoint corrupt
        run, c = run_copy("ck-all")
        for step in ("step_0000002", "step_0000004"):
            (run / "checkpoints" / step / "model.pt").write_bytes(b"")
        r.case("every checkpoint corrupt", r.cli("train", str(c), "--method", "response"),
               names="no valid checkpoint", expect_code=5)
        # read-only checkpoints/
        run, c = run_copy("ck-ro")
        shutil.rmtree(run / "checkpoints")
        if tmpfs(run / "checkpoints", "1m", readonly=True):
            res = r.cli("train", str(c), "--method", "response")
            umount(run / "checkpoints")
            r.case("read-only checkpoints/ (mount -o ro)", res, names=str(run / "checkpoints"),
                   expect_code=6, extra="before any training step")
        # full disk during a checkpoint: room for one checkpoint (the pre-flight passes), not
        # for the second
        ck_bytes = sum(f.stat().st_size for f in (base / "checkpoints" / "step_0000002")
                       .iterdir())
        disk = tmp / "smalldisk"
        if tmpfs(disk, f"{int(ck_bytes * 1.6) // 1024}k"):
            data = experiment(disk, "full", max_steps=6)
            data["data"]["shards_dir"] = str(tmp / "shards")
            data["teacher"] = {"model": str(tmp / "teacher")}
            data["distill"]["cache_dir"] = str(tmp / "cache")
            res = r.cli("train", str(r.config(data, "full")), "--method", "response")
            info = json.loads((disk / "full" / "response" / "rep0" / "run.json").read_text())
            umount(disk)
            r.case("disk fills during a checkpoint (tmpfs 1.6x one checkpoint)", res,
                   names="no space left on device", expect_code=6,
                   extra=f"run.json status {info.get('status')}")
        # pre-flight: no room for a checkpoint at all
        disk2 = tmp / "tinydisk"
        if tmpfs(disk2, f"{max(8, int(ck_bytes * 0.5) // 1024)}k"):
            data = experiment(disk2, "tiny", max_steps=6)
            data["data"]["shards_dir"] = str(tmp / "shards")
            data["teacher"] = {"model": str(tmp / "teacher")}
            res = r.cli("train", str(r.config(data, "tiny")), "--method", "response")
            umount(disk2)
            r.case("no room for one checkpoint (pre-flight)", res,
                   names="no space left on device", expect_code=6)
        # teacher cache larger than the disk
        disk3 = tmp / "cachedisk"
        if tmpfs(disk3, "64k"):
            data = experiment(tmp, "cdisk")
            data["distill"]["cache_dir"] = str(disk3 / "cache")
            res = r.cli("teacher", "cache", str(r.config(data, "cdisk")), "--signals",
                        "topk:8,hidden:2,pooled")
            umount(disk3)
            r.case("teacher cache larger than the disk (tmpfs 64 KB)", res,
                   names="teacher cache needs about", expect_code=6,
                   extra="estimate logged" if "estimated" in res.stderr + res.stdout else "")
        # SIGKILL mid-run: next start records the crash
        data = experiment(tmp, "kill", max_steps=400, checkpoint_every=50)
        c = r.config(data, "kill")
        proc = subprocess.Popen([sys.executable, "-m", "wattkd.cli", "train", str(c),
                                 "--method", "baseline"], env=r.env, cwd=tmp,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rj = tmp / "kill" / "baseline" / "rep0" / "run.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (rj.exists() and '"running"' in rj.read_text()
                                                   ):
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        from wattkd.runinfo import effective_status

        seen = effective_status(json.loads(rj.read_text()))
        res = r.cli("train", str(c), "--method", "baseline", "--set", "train.max_steps=60")
        info = json.loads(rj.read_text())
        r.case("SIGKILL mid-run: status of the dead run, then a rerun", res, names="recorded as a crash",
               recovered=bool(info.get("crashes")) and info.get("status") == "completed",
               extra=f"read as {seen!r} while dead; rerun records crashes="
                     f"{len(info.get('crashes', []))}, status {info.get('status')}")

        # random byte flips through the readers
        rng = random.Random(2121)
        flips: dict[str, dict[str, int]] = {}
        n_parts = len(json.loads((shards / "manifest.json").read_text())["parts"])
        work = tmp / "flips"
        det = named = 0
        for _ in range(args.flips):
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(shards, work)
            i = rng.randrange(n_parts)
            flip(work / f"part-{i:05d}.parquet", rng)
            try:
                ShardDataset(work, shuffle=False).part_ids(i)
            except ManifestError as exc:
                det += 1
                named += f"part-{i:05d}.parquet" in str(exc)
        flips["shard parts"] = {"flips": args.flips, "detected": det, "named": named}
        det = named = 0
        cols = ("topk_ids", "topk_logprobs", "topk_tail", "hidden_L2", "pooled_mean")
        n_cache = max(40, args.flips // 3)
        for _ in range(n_cache):
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(cfg.cache_dir, work)
            parts = json.loads((work / "manifest.json").read_text())["parts"]
            i = rng.randrange(len(parts))
            flip(work / parts[i]["file"], rng)
            reader = CacheReader(work, threads=1)
            try:
                reader.cells([parts[i]["row_start"]], cols)
            except CacheError as exc:
                det += 1
                named += parts[i]["file"] in str(exc)
            reader.close()
        flips["teacher-cache parts"] = {"flips": n_cache, "detected": det, "named": named}
        det = named = 0
        n_ck = max(40, args.flips // 3)
        for _ in range(n_ck):
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(base / "checkpoints" / "step_0000004", work)
            name = rng.choice((*checkpoint.CHECKPOINT_FILES, "state.json"))
            flip(work / name, rng)
            try:
                checkpoint.verify(work)
            except checkpoint.CheckpointError as exc:
                det += 1
                named += name in str(exc)
        flips["checkpoints"] = {"flips": n_ck, "detected": det, "named": named}
    finally:
        for m in ("smalldisk", "tinydisk", "cachedisk"):
            umount(tmp / m)
        shutil.rmtree(tmp, ignore_errors=True)

    result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "command": "python benchmarks/bad_inputs.py " + " ".join(argv or sys.argv[1:]),
              "seconds": round(time.time() - t_start, 1), "cases": r.rows, "flips": flips}
    (HERE / "results" / "bad_inputs.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| case | exit | detected | recovered | wording checked | error line / note |")
    print("|---|---|---|---|---|---|")
    for row in r.rows:
        rec = {True: "yes", False: "NO", None: "—"}[row["recovered"]]
        words = "yes" if row["wording_ok"] and not row["traceback"] else "NO"
        text = (row["error"] or row["note"]).replace("|", "\\|")
        if row["note"] and row["error"]:
            text += f" ({row['note']})"
        print(f"| {row['case']} | {row['exit_code']} | {'yes' if row['detected'] else 'NO'} "
              f"| {rec} | {words} | {text[:220]} |")
    print("\n| byte flips in | flips | detected | message names the file |")
    print("|---|---|---|---|")
    for k, v in flips.items():
        print(f"| {k} | {v['flips']} | {v['detected']} | {v['named']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
