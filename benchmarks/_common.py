"""Helpers shared by the benchmark scripts: timing, machine description, result files."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
#: The layers of the benchmarks of search, coreset, deployment and serving speed: one scale,
#: knnad 0.3's default, with which their committed results were measured (the multi-scale
#: default's cost is measured by bench_accuracy.py and bench_predict.py).
ONE_SCALE = "coarse"


def machine_tag() -> str:
    """Short label of this machine: ``cpu<N>`` or the GPU name, for result file names."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    return f"cpu{os.cpu_count()}"


def git_state(directory: Path = Path(__file__).resolve().parent) -> Dict[str, object]:
    """``git_commit``: the commit of the checkout holding ``directory`` (these benchmarks),
    and ``git_dirty``: whether tracked files other than committed results
    (``benchmarks/results``) differ from it (both None outside a git checkout): one
    benchmark's new result files do not mark the code that the next one measures as changed."""
    def git(*arguments: str) -> Optional[str]:
        try:
            run = subprocess.run(["git", *arguments], cwd=directory,
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return run.stdout.strip() if run.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                  ":(top,exclude)benchmarks/results") if commit else None
    return {"git_commit": commit, "git_dirty": None if changes is None else bool(changes)}


#: The code a run measures: read when the script starts, before it writes any result file
#: (a plot written before the tables would otherwise mark the run's own checkout as changed).
CODE_AT_START = git_state()


def machine_description() -> Dict[str, object]:
    """What a result was measured with: the CPU (model, cores, torch threads), the GPU (None
    without one), the code (:data:`CODE_AT_START`: git commit, and whether the checkout had
    uncommitted changes when the script started) and the versions of knnad, torch, faiss (None
    when it is not importable), numpy and Python."""
    import knnad
    from knnad.runtime import import_faiss

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            **CODE_AT_START, "knnad": knnad.__version__,
            "faiss": getattr(import_faiss(), "__version__", None), "numpy": np.__version__}


#: How result tables name each search backend: the reference is torch.cdist + topk.
METHODS = {"faiss": "faiss IndexFlatL2", "torch": "torch.cdist + topk"}


def method(backend: str, device: str = "cpu") -> str:
    """Table label of a search backend on a device, e.g. ``torch.cdist + topk (cpu)``."""
    return f"{METHODS[backend]} ({device})"


def search_backends() -> List[Tuple[str, str]]:
    """``(backend, device)`` pairs to measure here: faiss and torch on the CPU, and on the first
    GPU torch and, when faiss-gpu is installed, faiss."""
    from knnad.index import FlatL2Index

    found = [("faiss", "cpu"), ("torch", "cpu")]
    if torch.cuda.is_available():
        found.append(("torch", "cuda:0"))
        try:
            FlatL2Index(2, backend="faiss", device="cuda:0")
            found.append(("faiss", "cuda:0"))
        except ValueError:
            pass
    return found


def patch_embeddings(paths, extractor) -> np.ndarray:
    """Default-preprocessed, PatchCore-embedded features of images: float32 [N, h, w, D]."""
    from knnad.embedding import PatchEmbedder
    from knnad.preprocessing import Preprocessor

    preprocessor, embedder = Preprocessor(), PatchEmbedder()
    batches = []
    for start in range(0, len(paths), 16):
        images = torch.from_numpy(np.stack([preprocessor(p) for p in paths[start:start + 16]]))
        batches.append(embedder(extractor(images)).cpu().numpy())
    return np.concatenate(batches)


def best_time(function: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Fastest wall time in seconds of ``repeats`` calls after ``warmup`` calls (the minimum is
    the least noisy estimate on a shared machine)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def category_parser(description: str, root: Path = None) -> argparse.ArgumentParser:
    """Arguments of the detector benchmarks on one MVTec AD category: --mvtec-root (required,
    unless a default ``root`` is given), --category, --weights (MobileNetV2's) and --coreset."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mvtec-root", type=Path, required=root is None, default=root)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--coreset", type=float, default=0.1)
    return parser


def interval(values: np.ndarray, digits: int = 4) -> str:
    """Central 95 % of bootstrap ``values``, as text."""
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return f"{low:.{digits}f} to {high:.{digits}f}"


def markdown_table(rows: List[Dict[str, object]]) -> str:
    """Rows of equal keys as a Markdown table; floats get 4 significant digits."""
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, tables: Dict[str, List[Dict[str, object]]],
                  summary: Dict[str, object] = None, tag: str = None) -> Path:
    """Print the tables (title -> rows) and a summary, and write them to
    ``results/<name>-<tag>.md`` and ``.json`` (``tag``: :func:`machine_tag` unless given).
    Returns the .md path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    tag = tag or machine_tag()
    text = f"# {name} on {tag}\n\nMachine: {json.dumps(machine)}\n"
    for title, rows in tables.items():
        text += f"\n## {title}\n\n" + markdown_table(rows)
    if summary:
        text += "\n## Summary\n\n" + "".join(f"- {key}: {value:.4g}\n" if isinstance(value, float)
                                              else f"- {key}: {value}\n"
                                             for key, value in summary.items())
    print(text)
    stem = RESULTS / f"{name}-{tag}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "tables": tables,
                                                     "summary": summary or {}}, indent=2))
    return stem.with_suffix(".md")


class PeakMemory:
    """Peak resident memory (bytes) of this process above its level at entry, sampled every
    ``interval`` seconds in a background thread: ``with PeakMemory() as peak: ...; peak.bytes``.
    Counts what faiss and torch allocate natively, which tracemalloc does not see."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.bytes = 0

    @staticmethod
    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self.resident())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        import threading
        self._start = self._peak = self.resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self.resident())
        self.bytes = self._peak - self._start


def _busy_loop(stop) -> None:
    """One CPU-bound thread: a numpy matrix product, again and again."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        matrix = np.random.default_rng(0).random((600, 600))
        while not stop.is_set():
            matrix @ matrix


class CompetingProcess:
    """``with CompetingProcess(): ...``: one other CPU-bound process (a one-thread numpy matrix
    product loop) runs for the duration, as on a shared inspection PC or CI runner.
    ``CompetingProcess(False)`` does nothing, for the quiet case of the same code."""

    def __init__(self, active: bool = True):
        self.active = active

    def __enter__(self) -> "CompetingProcess":
        if self.active:
            import multiprocessing
            self._stop = multiprocessing.Event()
            self._process = multiprocessing.Process(target=_busy_loop, args=(self._stop,),
                                                    daemon=True)
            self._process.start()
            time.sleep(1.0)  # running before the measurement starts
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self._stop.set()
            self._process.join()
