"""The server's Prometheus metrics, in the text exposition format (version 0.0.4), written by
hand: requests by endpoint and status, the latency of ``POST /v1/predict`` as a histogram, the
images admitted and not yet answered (queue depth) and the images scored."""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import List, Sequence, Tuple

#: Content type of the exposition.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Upper bounds of the latency histogram's buckets, seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _label(value: str) -> str:
    """A label value escaped as the format requires (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters of one server, safe to update from any thread; :meth:`render` writes them."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        self._lock = threading.Lock()
        self._buckets = tuple(buckets)
        self._requests: Counter = Counter()  # (endpoint, status) -> count
        self._latency = [0] * (len(self._buckets) + 1)  # per bucket, the last one +Inf
        self._latency_sum = 0.0
        self._scored = 0

    def request(self, endpoint: str, status: int, seconds: float, predict: bool) -> None:
        """Count a request answered with ``status`` after ``seconds``; ``predict``: it was a
        ``POST /v1/predict``, whose latency the histogram holds."""
        with self._lock:
            self._requests[endpoint, status] += 1
            if predict:
                self._latency[bisect.bisect_left(self._buckets, seconds)] += 1
                self._latency_sum += seconds

    def scored(self, images: int) -> None:
        """Count ``images`` scored."""
        with self._lock:
            self._scored += images

    def requests(self) -> List[Tuple[str, int, int]]:
        """``(endpoint, status, count)`` of every endpoint and status seen, sorted."""
        with self._lock:
            return sorted((endpoint, status, count)
                          for (endpoint, status), count in self._requests.items())

    def render(self, queue_depth: int) -> str:
        """The exposition text, with the current ``queue_depth``."""
        requests = self.requests()
        with self._lock:
            latency, total, scored = list(self._latency), self._latency_sum, self._scored
        lines = ["# HELP knnad_requests_total HTTP requests answered, by endpoint and status.",
                 "# TYPE knnad_requests_total counter"]
        lines += [f'knnad_requests_total{{endpoint="{_label(endpoint)}",status="{status}"}} '
                  f'{count}' for endpoint, status, count in requests]
        lines += ["# HELP knnad_predict_duration_seconds Time from a POST /v1/predict's arrival "
                  "to its answer.", "# TYPE knnad_predict_duration_seconds histogram"]
        cumulative = 0
        for bound, count in zip([*map(repr, self._buckets), "+Inf"], latency):
            cumulative += count
            lines.append(f'knnad_predict_duration_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"knnad_predict_duration_seconds_sum {total!r}",
                  f"knnad_predict_duration_seconds_count {cumulative}",
                  "# HELP knnad_queue_depth Images admitted and not yet answered (decoding, "
                  "waiting or being scored).", "# TYPE knnad_queue_depth gauge",
                  f"knnad_queue_depth {queue_depth}",
                  "# HELP knnad_images_scored_total Images scored.",
                  "# TYPE knnad_images_scored_total counter", f"knnad_images_scored_total {scored}"]
        return "\n".join(lines) + "\n"
