"""How search cost grows with the memory bank: synthetic banks from 10^4 to 10^6 vectors at
d = 128, 448 and 1792, a fixed query set, each backend; time and the peak memory a search adds
(against the configured budget). Writes a table, JSON and a log-log plot
(benchmarks/results/scaling.png).

  python benchmarks/bench_scaling.py                  # full grid (needs ~16 GiB RAM at 10^6 x 1792)
  python benchmarks/bench_scaling.py --sizes 10000 100000 --dims 128
"""
import argparse
import gc

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from knnad.index import DEFAULT_MEMORY_BUDGET, FlatL2Index

from _common import (
    METHODS,
    RESULTS,
    PeakMemory,
    best_time,
    machine_tag,
    search_backends,
    write_results,
)


def plot(rows, path):
    figure = Figure(figsize=(7, 5), dpi=100)
    axes = figure.add_subplot()
    for (backend, device, dim) in sorted({(r["backend"], r["device"], r["d"]) for r in rows}):
        points = sorted((r["bank"], r["seconds"]) for r in rows
                        if (r["backend"], r["device"], r["d"]) == (backend, device, dim))
        axes.loglog(*zip(*points), marker="o", label=f"{backend} {device} d={dim}")
    sizes = sorted({r["bank"] for r in rows})
    reference = min(r["seconds"] for r in rows if r["bank"] == sizes[0])
    axes.loglog(sizes, [reference * s / sizes[0] for s in sizes], "k:", label="linear growth")
    axes.set(xlabel="bank size (vectors)", ylabel="search time (s)",
             title=f"Search time for a fixed query set ({machine_tag()})")
    axes.legend(fontsize="small")
    figure.tight_layout()
    FigureCanvasAgg(figure)
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 448, 1792])
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--budget-mib", type=int, default=DEFAULT_MEMORY_BUDGET // 2**20)
    args = parser.parse_args()
    budget = args.budget_mib * 2**20
    rng = np.random.default_rng(0)
    rows = []
    for dim in args.dims:
        queries = rng.standard_normal((args.queries, dim), dtype=np.float32)
        for size in args.sizes:
            bank = rng.standard_normal((size, dim), dtype=np.float32)
            for backend, device in search_backends():
                index = FlatL2Index(dim, backend=backend, device=device, memory_budget=budget)
                index.add(bank)
                with PeakMemory() as peak:  # first, before timing runs leave freed pages behind
                    index.search(queries, args.k)
                seconds = best_time(lambda: index.search(queries, args.k), repeats=2, warmup=0)
                outputs = args.queries * args.k * 12  # the [m, k] float32 + int64 results
                rows.append({"backend": METHODS[backend], "device": device, "d": dim, "bank": size,
                             "seconds": seconds,
                             "ns per query-vector": 1e9 * seconds / (size * args.queries),
                             "peak search MiB": peak.bytes / 2**20,
                             "within budget": peak.bytes <= budget + outputs})
                index = None  # free the bank copy before the next backend builds its own
                gc.collect()
            del bank
            gc.collect()
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS / "scaling.png")
    write_results("scaling",
                  {f"{args.queries} queries, k={args.k}, budget {args.budget_mib} MiB": rows},
                  growth_exponents(rows))


def growth_exponents(rows):
    """Least-squares slope of log(time) against log(bank size) per backend and d: 1 is linear."""
    slopes = {}
    for key in sorted({(r["backend"], r["device"], r["d"]) for r in rows}):
        points = [(r["bank"], r["seconds"]) for r in rows
                  if (r["backend"], r["device"], r["d"]) == key]
        if len(points) > 1:
            sizes, seconds = np.log(np.array(points)).T
            slope = float(np.polyfit(sizes, seconds, 1)[0])
            slopes[f"growth exponent {key[0]} {key[1]} d={key[2]}"] = slope
    return slopes


if __name__ == "__main__":
    main()
