"""knnad serve on loopback against Detector.predict on the same images, in the same run.

Fits MobileNetV2 (--weights, 10 % coreset) on a genuine MVTec AD category's train images,
calibrates it on the category's good test images and saves it; then starts `knnad serve` in its
own process on 127.0.0.1 (a free port) and measures, on the category's test images:

- Detector.predict in this process: all the images in one call (images/s, the best of two
  after a warm-up), and one image per call (the median latency of a single predict call);
- the server with 1, 4 and 16 concurrent clients (threads of this process, each with its own
  HTTP connection, one image per request, --passes passes over the images): images/s, p50 and
  p99 latency, errors (any answer but 200, or a score that differs from predict's by more than
  1e-6);
- the server's resident memory (VmRSS) after a warm-up and after --memory-requests (5,000)
  requests (the clients' runs count; 4 clients send the rest);
- an overload run: a second server with --queue-size 4, 16 clients for --overload-s seconds
  without pause: 503s with Retry-After, then, the load gone, 20 requests one after the other.

The clients share the two CPUs with the server, as on a loopback deployment of this machine.

  python benchmarks/bench_serve.py --mvtec-root ../shared/data/mvtec \\
      --weights ../shared/weights/mobilenet_v2-b0353104.pth
"""
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import httpx
import numpy as np

from knnad import Detector
from knnad.datasets import MVTecAD

from _common import ONE_SCALE, best_time, category_parser, write_results

#: The largest allowed difference between a served score and predict's.
TOLERANCE = 1e-6


def server_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024


class Server:
    """``knnad serve MODEL --port 0 ARGS`` in its own process, its log in a file."""

    def __init__(self, model: Path, log: Path, *args: str):
        self.log = open(log, "w+")
        self.process = subprocess.Popen([sys.executable, "-m", "knnad.cli", "serve", str(model),
                                         "--port", "0", *args], stderr=self.log)
        deadline = time.monotonic() + 120
        while True:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/", Path(log).read_text())
            if found:
                self.url = found.group(1)
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"knnad serve did not start:\n{Path(log).read_text()}")
            time.sleep(0.2)
        while True:  # the socket listens; uvicorn answers once started
            try:
                httpx.get(f"{self.url}/healthz")
                break
            except httpx.TransportError:
                time.sleep(0.1)

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=120)
        self.log.close()
        return code


def run_clients(url: str, images: List[Tuple[str, bytes]], expected: Dict[str, float],
                clients: int, requests: int, seconds: float = None) -> Dict[str, object]:
    """``requests`` requests of one image each (or as many as fit in ``seconds``), from
    ``clients`` threads at once: wall time, latencies of the answered requests, and counts by
    status and of wrong scores."""
    lock, counter = threading.Lock(), iter(range(requests))
    latencies, statuses, wrong, retry_after = [], {}, [0], set()
    start = time.perf_counter()

    def client():
        with httpx.Client(timeout=120) as session:
            while True:
                with lock:
                    number = next(counter, None)
                if number is None or (seconds and time.perf_counter() - start > seconds):
                    return
                name, data = images[number % len(images)]
                sent = time.perf_counter()
                try:
                    answer = session.post(f"{url}/v1/predict",
                                          files=[("image", (name, data, "image/png"))])
                    status = answer.status_code
                except httpx.TransportError:
                    status = "transport error"
                took = time.perf_counter() - sent
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(took)
                        score = answer.json()["images"][0]["score"]
                        wrong[0] += abs(score - expected[name]) > TOLERANCE
                    elif status == 503:
                        retry_after.add(answer.headers.get("retry-after"))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"seconds": time.perf_counter() - start, "latencies": np.array(latencies),
            "statuses": statuses, "wrong": wrong[0], "retry_after": sorted(retry_after)}


def main() -> None:
    parser = category_parser(__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--passes", type=int, default=2,
                        help="passes over the test images per client count (default: 2)")
    parser.add_argument("--single-calls", type=int, default=20,
                        help="single-image predict calls timed (default: 20)")
    parser.add_argument("--overload-s", type=float, default=10.0)
    parser.add_argument("--memory-requests", type=int, default=5000,
                        help="requests between the two memory readings (default: 5000)")
    args = parser.parse_args()
    train = MVTecAD(args.mvtec_root, args.category, "train")
    test = MVTecAD(args.mvtec_root, args.category, "test")
    paths = [sample.path for sample in test.samples]
    # Names unique per image (the folders hold 000.png, 001.png ... each).
    names = [f"{Path(path).parent.name}_{Path(path).name}" for path in paths]
    images = [(name, Path(path).read_bytes()) for name, path in zip(names, paths)]
    good = [sample.path for sample in test.samples if sample.label == 0]
    weights = ["--weights", args.weights] if Path(args.weights).suffix == ".pth" else []
    detector = Detector("mobilenet_v2", layers=ONE_SCALE, weights=args.weights,
                        coreset=args.coreset, progress=False).fit(train).calibrate(good)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = detector.save(folder / "model.npz")
        expected = dict(zip(names, map(float, detector.predict(paths).image_scores)))
        predict_seconds = best_time(lambda: detector.predict(paths), repeats=2)
        single = []
        for number in range(args.single_calls):
            start = time.perf_counter()
            detector.predict([paths[number % len(paths)]])
            single.append(time.perf_counter() - start)
        single_p50 = float(np.median(single))
        predict_rate = len(paths) / predict_seconds
        rows = [{"run": "Detector.predict, all images in one call", "clients": "-",
                 "requests": len(paths), "images/s": predict_rate, "vs predict": 1.0,
                 "p50 ms": "-", "p99 ms": "-", "errors": 0},
                {"run": "Detector.predict, one image per call", "clients": "-",
                 "requests": args.single_calls, "images/s": 1 / single_p50,
                 "vs predict": 1 / single_p50 / predict_rate, "p50 ms": 1000 * single_p50,
                 "p99 ms": 1000 * float(np.percentile(single, 99)), "errors": 0}]

        server = Server(model, folder / "serve.log", *weights)
        run_clients(server.url, images, expected, 16, 3 * len(images))  # warm-up, all batch sizes
        rss_before = server_rss_mib(server.process.pid)
        sent, by_clients = 0, {}
        for clients in args.clients:
            result = run_clients(server.url, images, expected, clients, args.passes * len(images))
            sent += sum(result["statuses"].values())
            errors = sum(count for status, count in result["statuses"].items() if status != 200)
            rate = result["statuses"].get(200, 0) / result["seconds"]
            by_clients[clients] = p50, p99 = [1000 * float(np.percentile(result["latencies"], q))
                                              for q in (50, 99)]
            rows.append({"run": "knnad serve", "clients": clients,
                         "requests": sum(result["statuses"].values()), "images/s": rate,
                         "vs predict": rate / predict_rate, "p50 ms": p50, "p99 ms": p99,
                         "errors": errors + result["wrong"]})
        rest = run_clients(server.url, images, expected, 4, args.memory_requests - sent)
        rest_errors = sum(count for status, count in rest["statuses"].items() if status != 200)
        rss_after = server_rss_mib(server.process.pid)
        memory = [{"requests": 0, "server RSS MiB": rss_before},
                  {"requests": args.memory_requests, "server RSS MiB": rss_after}]
        rows.append({"run": f"knnad serve, the rest of the {args.memory_requests} requests",
                     "clients": 4,
                     "requests": sum(rest["statuses"].values()),
                     "images/s": rest["statuses"].get(200, 0) / rest["seconds"],
                     "vs predict": rest["statuses"].get(200, 0) / rest["seconds"] / predict_rate,
                     "p50 ms": 1000 * float(np.percentile(rest["latencies"], 50)),
                     "p99 ms": 1000 * float(np.percentile(rest["latencies"], 99)),
                     "errors": rest_errors + rest["wrong"]})
        stopped = server.stop()

        small = Server(model, folder / "overload.log", "--queue-size", "4", *weights)
        burst = run_clients(small.url, images, expected, 16, 10**6, seconds=args.overload_s)
        calm = run_clients(small.url, images, expected, 1, 20)
        small_stopped = small.stop()
    overload = [{"phase": f"16 clients for {args.overload_s:g} s, --queue-size 4",
                 "requests": sum(burst["statuses"].values()),
                 "200": burst["statuses"].get(200, 0), "503": burst["statuses"].get(503, 0),
                 "other": sum(count for status, count in burst["statuses"].items()
                              if status not in (200, 503)),
                 "Retry-After": ", ".join(map(str, burst["retry_after"])) or "-",
                 "wrong scores": burst["wrong"]},
                {"phase": "then 1 client, 20 requests", "requests": sum(calm["statuses"].values()),
                 "200": calm["statuses"].get(200, 0), "503": calm["statuses"].get(503, 0),
                 "other": sum(count for status, count in calm["statuses"].items()
                              if status not in (200, 503)),
                 "Retry-After": "-", "wrong scores": calm["wrong"]}]
    served = {row["clients"]: row for row in rows if row["run"] == "knnad serve"}
    summary = {
        "images": len(paths), "model": f"mobilenet_v2 {args.weights}, coreset {args.coreset}, "
                                       f"batch_size {detector.batch_size}",
        "Detector.predict images/s": predict_rate,
        "single predict call p50 ms": 1000 * single_p50,
        **{f"served/predict images/s at {clients} clients (target >= 0.85)":
           served[clients]["vs predict"] for clients in (4, 16) if clients in served},
        **({"p99 at 1 client / single predict p50 (target <= 1.5)":
            by_clients[1][1] / (1000 * single_p50)} if 1 in by_clients else {}),
        f"server RSS growth over {args.memory_requests} requests (target < 5 %)":
            f"{100 * (rss_after / rss_before - 1):.2f} %",
        "errors over all runs but the overload": sum(row["errors"] for row in rows),
        "exit status after SIGTERM": f"{stopped}, {small_stopped}",
    }
    write_results(f"serve-{args.category}", {
        "Throughput and latency, one image per request": rows,
        "Server memory": memory, "Overload and recovery": overload}, summary)


if __name__ == "__main__":
    main()
