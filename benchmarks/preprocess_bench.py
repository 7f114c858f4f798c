"""Preprocessing throughput: ``data.preprocess`` vs Megatron-LM's ``tools/preprocess_data.py``.

Both tools tokenize the same JSONL input with the same HF tokenizer directory and the same worker
count (``--workers N``), each as its own command. Reported for each: tokens/s, the number of
tokens written (end-of-document ids included) over the command's wall time, start-up included
(interpreter, imports, tokenizer load, worker start: what a user waits for); and tokens per CPU
second (user + system time of the command and its workers), which machine load disturbs less.
Both run with ``TOKENIZERS_PARALLELISM=false``, so that a worker is one core: the comparison is per
worker. Runs alternate between the two tools within each repetition and a ratio ours / Megatron-LM
is the median of the per-repetition ratios (:mod:`benchmarks.common`). Before timing, the two
outputs are compared: the same documents with the same token ids, or the benchmark stops.

Input: the Python standard library's sources on this interpreter, cut at line ends into documents
of about 4 KB, ``--size-mb`` MB of JSONL. Tokenizer: a byte-level BPE (``--vocab-size``, GPT-2
style pre-tokenization) trained locally with ``tokenizers`` on the first few MB of that text and
saved with ``transformers``' ``save_pretrained``; Megatron-LM reads it as ``--tokenizer-type
HuggingFaceTokenizer``. Both are built once under ``--work-dir`` (default: a temporary directory).

Megatron-LM's script is not a dependency of this project: give a checkout of its repository
(``--megatron-lm DIR``, or the ``MEGATRON_LM`` environment variable), at the tag of the installed
megatron-core (``core_v0.16.1``); its newer ``megatron.core`` imports Triton in modules that
every import reaches, which no stub here stands in for. It runs with the checkout first on
``PYTHONPATH``, plus two shims in its subprocess only (a directory of its own, never this
project): ``megatron.training`` imports Triton GPU kernels
(``megatron.core.transformer.custom_layers.batch_invariant_kernels``) at module level, and Triton
is not installed on a CPU machine, so that module is replaced by a stub whose functions raise if
called (preprocessing calls none of them); and its BERT tokenizer imports ``six``, for which, where
it is not installed, a module with the four names it reads stands in.

    python -m benchmarks.preprocess_bench --megatron-lm path/to/Megatron-LM [--workers 1 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from benchmarks.common import row

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = "preprocess"
TOKENIZER_TRAIN_BYTES = 4_000_000
DOCUMENT_CHARS = 4000
MEGATRON_SCRIPT = Path("tools") / "preprocess_data.py"

# The first shim Megatron-LM's script needs on a machine without Triton (see the module docstring); it
# goes into a directory of its own on the subprocess's PYTHONPATH, never into this project.
_SHIM = '''"""Stub for a Triton-only module imported at module level by megatron.training (no Triton here)."""
import sys
import types

_name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
_stub = types.ModuleType(_name)


def _needs_triton(*args, **kwargs):
    raise RuntimeError("batch-invariant kernels need Triton, which is not installed")


for _fn in ("set_batch_invariant_mode", "is_batch_invariant_mode_enabled", "disable_batch_invariant_mode",
            "enable_batch_invariant_mode"):
    setattr(_stub, _fn, _needs_triton)
sys.modules[_name] = _stub
'''
# megatron.training's BERT tokenizer imports six (Python 2 compatibility) at module level; where six is
# not installed, a module with the four names it reads stands in.
_SIX = '''"""Stand-in for six: the names megatron.training.tokenizer.bert_tokenization reads."""
PY2 = False
PY3 = True
text_type = str
binary_type = bytes
'''


def stdlib_documents() -> List[str]:
    """The sources of the standard library's modules (installed packages excluded), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.relative_to(root).parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            texts.append(text)
    return texts


def chunks(text: str, size: int) -> List[str]:
    """``text`` cut at line ends into pieces of about ``size`` characters (web documents are a few KB)."""
    pieces, lines, length = [], [], 0
    for line in text.splitlines(keepends=True):
        lines.append(line)
        length += len(line)
        if length >= size:
            pieces.append("".join(lines))
            lines, length = [], 0
    if lines:
        pieces.append("".join(lines))
    return pieces


def write_corpus(path: Path, size_mb: float) -> int:
    """``size_mb`` MB of JSONL documents (the standard library's modules cut into pieces of about
    ``DOCUMENT_CHARS``, repeated if it is too small); returns the number of documents."""
    docs = [piece for text in stdlib_documents() for piece in chunks(text, DOCUMENT_CHARS)]
    limit, written = int(size_mb * 1e6), 0
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < limit:
            for text in docs:
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                written += len(line)
                count += 1
                if written >= limit:
                    break
    return count


def train_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on the first few MB of the standard library (the project's own
    :func:`~megatron_ext.data.tokenizers.train_bpe`), saved as a HF directory."""
    from megatron_ext.data.tokenizers import save_hf_tokenizer, train_bpe

    texts, total = [], 0
    for text in stdlib_documents():
        texts.append(text)
        total += len(text)
        if total >= TOKENIZER_TRAIN_BYTES:
            break
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        save_hf_tokenizer(train_bpe(texts, vocab_size, Path(scratch) / "tokenizer.json"), path)


def prepare(work_dir: Path, size_mb: float, vocab_size: int) -> Dict[str, Path]:
    """The input and the tokenizer under ``work_dir``, built unless they already exist."""
    work_dir.mkdir(parents=True, exist_ok=True)
    corpus = work_dir / f"stdlib-{size_mb:g}mb.jsonl"
    tokenizer = work_dir / f"bpe-{vocab_size}"
    if not corpus.exists():
        write_corpus(corpus.with_suffix(".tmp"), size_mb)
        corpus.with_suffix(".tmp").replace(corpus)
    if not (tokenizer / "tokenizer.json").exists():
        train_tokenizer(tokenizer, vocab_size)
    return {"corpus": corpus, "tokenizer": tokenizer}


def checkout_problem(megatron_lm: Optional[str]) -> Optional[str]:
    """Why ``megatron_lm`` cannot be used as a Megatron-LM checkout, or None."""
    if not megatron_lm:
        return (
            "no Megatron-LM checkout given: pass --megatron-lm DIR (or set MEGATRON_LM=DIR) naming a checkout "
            "of https://github.com/NVIDIA/Megatron-LM at tag core_v0.16.1 (that of the installed megatron-core)"
        )
    if not (Path(megatron_lm) / MEGATRON_SCRIPT).is_file():
        return f"{megatron_lm} is not a Megatron-LM checkout: it has no {MEGATRON_SCRIPT}"
    return None


def _run(cmd: Sequence[str], env: Dict[str, str], cwd: Path) -> Dict[str, float]:
    """Wall time and CPU time (user + system, of the command and every process it waited for: its
    workers) of one command; its output is shown only if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stdout[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu}


class Tools:
    """The two commands, on the same input, tokenizer and worker count."""

    def __init__(self, megatron_lm: Path, corpus: Path, tokenizer: Path, out_dir: Path):
        self.corpus, self.tokenizer, self.out_dir = corpus, tokenizer, out_dir
        self.megatron_lm = megatron_lm.resolve()
        shim = out_dir / "shim"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "sitecustomize.py").write_text(_SHIM)
        if importlib.util.find_spec("six") is None:
            (shim / "six.py").write_text(_SIX)
        offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.ours_env = {**os.environ, **offline}
        self.megatron_env = {
            **os.environ,
            **offline,
            "PYTHONPATH": os.pathsep.join([str(self.megatron_lm), str(shim)]),
            "PYTHONWARNINGS": "ignore",
        }

    def ours_prefix(self, workers: int) -> Path:
        return self.out_dir / f"ours-w{workers}"

    def megatron_prefix(self, workers: int) -> Path:
        return self.out_dir / f"megatron-w{workers}_text_document"

    def ours(self, workers: int) -> Dict[str, float]:
        cmd = [sys.executable, "-m", "data.preprocess", "--input", str(self.corpus), "--output-prefix"]
        cmd += [str(self.ours_prefix(workers)), "--tokenizer", str(self.tokenizer), "--workers", str(workers)]
        return _run(cmd, self.ours_env, REPO)

    def megatron(self, workers: int) -> Dict[str, float]:
        cmd = [sys.executable, str(self.megatron_lm / MEGATRON_SCRIPT), "--input", str(self.corpus)]
        cmd += ["--output-prefix", str(self.out_dir / f"megatron-w{workers}"), "--workers", str(workers)]
        cmd += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(self.tokenizer), "--append-eod"]
        cmd += ["--log-interval", "1000000000"]
        return _run(cmd, self.megatron_env, self.out_dir)


def documents(prefix: Path):
    """(tokens [n], document lengths [d]) of an indexed dataset, read with Megatron-Core."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    lengths = np.asarray(ds.index.sequence_lengths, dtype=np.int64)
    tokens = np.fromfile(str(prefix) + ".bin", dtype=ds.index.dtype).astype(np.int64)
    return tokens, lengths


def same_output(ours: Path, megatron: Path) -> int:
    """Check that both tools wrote the same documents with the same token ids; the token count."""
    ours_tokens, ours_lengths = documents(ours)
    mlm_tokens, mlm_lengths = documents(megatron)
    if not np.array_equal(ours_lengths, mlm_lengths):
        raise RuntimeError(
            f"the tools wrote different documents: {len(ours_lengths)} vs {len(mlm_lengths)} documents, "
            f"{int(ours_lengths.sum())} vs {int(mlm_lengths.sum())} tokens"
        )
    if not np.array_equal(ours_tokens, mlm_tokens):
        first = int(np.flatnonzero(ours_tokens != mlm_tokens)[0])
        raise RuntimeError(f"the tools wrote different token ids (first difference at token {first})")
    return len(ours_tokens)


def measure(tools: Tools, workers: Sequence[int], reps: int) -> List[dict]:
    rows = []
    for n in workers:
        tools.ours(n)  # warm-up (page cache, compiled modules) that also writes the outputs to compare
        tools.megatron(n)
        tokens = same_output(tools.ours_prefix(n), tools.megatron_prefix(n))
        runs: Dict[str, List[Dict[str, float]]] = {"ours": [], "megatron": []}
        for rep in range(reps):
            for name in ("ours", "megatron") if rep % 2 == 0 else ("megatron", "ours"):
                runs[name].append(getattr(tools, name)(n))

        def tokens_per(name: str, clock: str) -> float:
            return tokens / statistics.median(r[clock] for r in runs[name])

        def ratio(clock: str) -> float:  # ours / Megatron-LM tokens/s, per repetition, then the median
            return statistics.median(m[clock] / o[clock] for o, m in zip(runs["ours"], runs["megatron"]))

        what = f"{n} worker{'s' if n > 1 else ''}"
        rows += [
            row(
                BENCHMARK, f"data.preprocess tokens/s, {what} ({tokens:,} tokens)", tokens_per("ours", "wall"), "report"
            ),
            row(
                BENCHMARK, f"Megatron-LM preprocess_data.py tokens/s, {what}", tokens_per("megatron", "wall"), "report"
            ),
            row(BENCHMARK, f"tokens/s ratio data.preprocess / Megatron-LM, {what}", ratio("wall"), ">= 1.0"),
            row(BENCHMARK, f"data.preprocess tokens per CPU second, {what}", tokens_per("ours", "cpu"), "report"),
            row(BENCHMARK, f"Megatron-LM tokens per CPU second, {what}", tokens_per("megatron", "cpu"), "report"),
            row(
                BENCHMARK, f"tokens per CPU second ratio data.preprocess / Megatron-LM, {what}", ratio("cpu"), "report"
            ),
        ]
    return rows


def run(
    reps: int = 3,
    megatron_lm: Optional[str] = None,
    workers: Sequence[int] = (1, 2),
    size_mb: float = 30.0,
    vocab_size: int = 32000,
    work_dir: Optional[str] = None,
) -> List[dict]:
    """Rows for :mod:`benchmarks.run`; none (with a message saying why) without a Megatron-LM checkout."""
    megatron_lm = megatron_lm or os.environ.get("MEGATRON_LM")
    problem = checkout_problem(megatron_lm)
    if problem:
        print(f"preprocess: skipped, {problem}", flush=True)
        return []
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="preprocess-bench-")
        work_dir = tmp
    try:
        inputs = prepare(Path(work_dir), size_mb, vocab_size)
        out_dir = Path(work_dir) / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        tools = Tools(Path(megatron_lm), inputs["corpus"], inputs["tokenizer"], out_dir)
        return measure(tools, workers, reps)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-lm", metavar="DIR", default=os.environ.get("MEGATRON_LM"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=3, help="timed runs of each tool per worker count")
    parser.add_argument("--size-mb", type=float, default=30.0, help="size of the JSONL input")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--work-dir", default=None, help="keep the input, tokenizer and outputs here (reused)")
    args = parser.parse_args()
    if args.reps < 1 or min(args.workers) < 1:
        parser.error("--reps and --workers take positive numbers")
    problem = checkout_problem(args.megatron_lm)
    if problem:
        parser.error(problem)
    for r in run(args.reps, args.megatron_lm, args.workers, args.size_mb, args.vocab_size, args.work_dir):
        print(f"{r['metric']:<82} {r['value']:>14,.2f}  {r['target']}")


if __name__ == "__main__":
    main()
