"""knnad serve (issue #24): a real uvicorn on 127.0.0.1 serving a saved model, spoken to over real
HTTP. Scores equal Detector.predict's, several images per request and across concurrent
requests; bad input gets 413, 415, 422 or 400 with knnad's one-line message, never 500; a full
queue 503 with Retry-After, and the server recovers; the token guards every endpoint but
/healthz; /metrics counts; SIGTERM and Ctrl-C drain what is in flight and exit 0; the model file
is never written; the page at / shows, in the system's chromium, the scores predict gives."""
import asyncio
import base64
import gc
import hashlib
import io
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import knnad
from knnad import Detector
from knnad.cli import demo_root, main
from knnad.serve.app import create_app
from knnad.serve.batching import MicroBatcher, QueueFull
from knnad.serve.server import listening_socket, uvicorn_server
from knnad.serve.settings import ServeSettings, is_loopback

from test_html_report import CHROMIUM, need_browser

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "images" / "serve.png"
TOKEN = "test-token-24"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGES = sorted((demo_root() / "bottle" / "test").glob("*/*.png"))
#: The module's server: batches of 4, at most 6 images admitted, bodies up to 1 MiB.
SETTINGS = dict(batch_size=4, queue_size=6, max_upload_mb=1.0, token=TOKEN)


def file_state(path: Path):
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def running(app):
    """``app`` served by a real uvicorn on a free loopback port, in a thread: its base URL."""
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn_server(app, ServeSettings())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def model_before(fast_model):
    """The model file's modification time and hash before any server read it."""
    return file_state(fast_model)


@pytest.fixture(scope="module")
def expected(fast_model, model_before):
    """Detector.predict's score of each test image of the sample, by path."""
    detector = Detector.load(fast_model, progress=False)
    prediction = detector.predict(IMAGES)
    assert prediction.labels is not None  # fast_model is calibrated
    return {path: (float(score), bool(label)) for path, score, label in
            zip(IMAGES, prediction.image_scores, prediction.labels)}


@pytest.fixture(scope="module")
def url(fast_model, model_before):
    with running(create_app(fast_model, **SETTINGS)) as base:
        yield base


def files(paths):
    return [("image", (path.name, path.read_bytes(), "image/png")) for path in paths]


def png(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def metrics(base: str):
    """The /metrics samples: ``{name{labels}: value}``."""
    text = httpx.get(f"{base}/metrics", headers=AUTH).text
    return {name: float(value) for name, value in re.findall(r"^(\S+) (\S+)$", text, re.M)}


def check_scores(answer, paths, expected):
    assert answer.status_code == 200, answer.text
    rows = answer.json()["images"]
    assert [row["name"] for row in rows] == [path.name for path in paths]
    for row, path in zip(rows, paths):
        score, label = expected[path]
        assert abs(row["score"] - score) <= 1e-6, (path, row["score"], score)
        assert row["label"] is label and row["threshold"] is not None
        assert row["map_max"] >= 0 and "overlay_png" not in row


def test_scores_equal_predict_several_images_per_request(url, expected):
    paths = IMAGES[:5]
    answer = httpx.post(f"{url}/v1/predict", files=files(paths), headers=AUTH, timeout=60)
    check_scores(answer, paths, expected)
    answer = httpx.post(f"{url}/v1/predict?overlay=true", files=files(IMAGES[5:6]), headers=AUTH,
                        timeout=60)
    row, = answer.json()["images"]
    with Image.open(io.BytesIO(base64.b64decode(row["overlay_png"]))) as overlay:
        assert overlay.format == "PNG" and overlay.size == (224, 224) and overlay.mode == "RGB"


def test_concurrent_requests_never_mix(url, expected):
    """Three clients at once, two images each (six: the queue's size, so none is refused),
    three rounds: batches of four mix the requests, and each gets its own rows."""
    groups = [IMAGES[i:i + 2] for i in (0, 4, 8)]
    barrier = threading.Barrier(len(groups))
    answers = {}

    def client(number):
        with httpx.Client(headers=AUTH, timeout=60) as session:
            for round_ in range(3):
                barrier.wait()
                answers[number, round_] = session.post(f"{url}/v1/predict",
                                                       files=files(groups[number]))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(groups))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (number, _), answer in answers.items():
        check_scores(answer, groups[number], expected)
    assert len(answers) == 9


def test_the_model_is_read_and_scored_on_one_thread(fast_model, expected, monkeypatch):
    """A model served from its path is loaded on the thread that scores it (a second thread
    running torch slows a forward pass ~1.6x: the app module's docstring), and scores as
    predict does, on torch's thread count one request at a time and on one thread (on the
    model's thread or the helper) under concurrent requests; load options with a fitted
    Detector are refused."""
    threads = {"load": set(), "predict": set()}
    counts = []  # torch's thread count at each predict call
    load, predict = Detector.load.__func__, Detector.predict

    def spy_load(cls, *args, **kwargs):
        threads["load"].add(threading.get_ident())
        return load(cls, *args, **kwargs)

    def spy_predict(self, *args, **kwargs):
        threads["predict"].add(threading.get_ident())
        counts.append(torch.get_num_threads())
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(Detector, "load", classmethod(spy_load))
    monkeypatch.setattr(Detector, "predict", spy_predict)
    default = torch.get_num_threads()
    with running(create_app(fast_model, **SETTINGS)) as base:
        for path in IMAGES[:3]:
            check_scores(httpx.post(f"{base}/v1/predict", files=files([path]), headers=AUTH),
                         [path], expected)
        assert len(threads["load"]) == 1 and threads["predict"] == threads["load"]
        assert threading.get_ident() not in threads["load"] and counts == [default] * 3
        counts.clear()

        def one(path):
            check_scores(httpx.post(f"{base}/v1/predict", files=files([path]), headers=AUTH,
                                    timeout=60), [path], expected)

        burst = [threading.Thread(target=one, args=(path,)) for path in IMAGES[:6]]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
    assert 1 in counts  # concurrent: batches on one thread
    assert torch.get_num_threads() == default
    with pytest.raises(ValueError, match="pass the saved model's path"):
        create_app(Detector.load(fast_model, progress=False), weights="x.pth")


def test_the_batcher_mixes_requests_and_answers_each_its_own_rows():
    """Twelve requests of one to three items each, at once: batches hold items of several
    requests, none more than batch_size, and every request gets the results of its items."""
    batches = []

    def score(items, worker, alone):
        batches.append(list(items))
        time.sleep(0.01)
        return [item * 10 for item in items]

    async def run():
        batcher = MicroBatcher(score, batch_size=5, queue_size=100, max_wait_s=0.005)
        batcher.start()
        requests = [list(range(100 * n, 100 * n + 1 + n % 3)) for n in range(12)]

        async def one(items):
            with batcher.admit(len(items)) as admission:
                return await admission.score(items)

        try:
            return requests, await asyncio.gather(*map(one, requests))
        finally:
            batcher.close()

    requests, answers = asyncio.run(run())
    assert answers == [[item * 10 for item in items] for items in requests]
    assert max(map(len, batches)) <= 5 and len(batches) < len(requests)
    assert any(len({item // 100 for item in batch}) > 1 for batch in batches)
    batcher = MicroBatcher(score, batch_size=5, queue_size=3, max_wait_s=0)
    with batcher.admit(2):
        with pytest.raises(QueueFull):
            with batcher.admit(2):
                pass
        assert batcher.depth == 2
    assert batcher.depth == 0 and batcher._coming == 0


def test_a_helper_takes_batches_only_while_the_first_worker_scores():
    """One request at a time: every batch on worker 0, alone. Twenty at once, with one helper:
    the helper scores batches while worker 0 scores another that is not alone (they overlap),
    every request gets its own results, and close() stops both."""
    first_busy = []  # at each helper batch: whether worker 0 was scoring one, not alone
    calls = []

    def score(items, worker, alone):
        calls.append((worker, alone))
        if worker:
            first_busy.append(batcher._busy[0] and not batcher._alone)
        time.sleep(0.02)
        return [(item, worker) for item in items]

    batcher = MicroBatcher(score, batch_size=2, queue_size=100, max_wait_s=0, helpers=1)

    async def run():
        batcher.start()

        async def one(item):
            with batcher.admit(1) as admission:
                return (await admission.score([item]))[0]

        try:
            alone = [await one(item) for item in range(5)]
            together = await asyncio.gather(*map(one, range(100, 120)))
        finally:
            batcher.close()
        return alone, together

    alone, together = asyncio.run(run())
    assert alone == [(item, 0) for item in range(5)]
    assert calls[:5] == [(0, True)] * 5  # one request at a time: each batch alone
    assert [item for item, _ in together] == list(range(100, 120))
    assert {worker for _, worker in together} == {0, 1}
    assert first_busy and all(first_busy)
    assert batcher._threads == [] and batcher._busy == [False, False]


def test_a_batch_waits_only_for_images_on_their_way():
    """With nothing else admitted, an image is scored at once (max_wait_s is 1 s); with images
    admitted and being decoded, the batch waits for them, and no longer once the one whose
    decoding fails gives its place back."""
    batches = []

    def score(items, worker, alone):
        batches.append(list(items))
        return items

    async def run():
        batcher = MicroBatcher(score, batch_size=4, queue_size=10, max_wait_s=1.0)
        batcher.start()

        async def image(item, decoding_s):
            with batcher.admit(1) as admission:
                await asyncio.sleep(decoding_s)
                return await admission.score([item])

        async def undecodable():
            with batcher.admit(1):
                await asyncio.sleep(0.05)

        try:
            start = time.monotonic()
            await image("alone", 0)
            alone = time.monotonic() - start
            start = time.monotonic()
            await asyncio.gather(image("first", 0), image("second", 0.1), undecodable())
            return alone, time.monotonic() - start
        finally:
            batcher.close()

    alone, together = asyncio.run(run())
    assert batches == [["alone"], ["first", "second"]]
    assert alone < 0.5 and together < 0.5


def test_token_guards_every_endpoint_but_healthz(url):
    for path in ("/v1/model", "/metrics", "/"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            answer = httpx.get(url + path, headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert answer.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + path, headers=AUTH).status_code == 200
    answer = httpx.post(f"{url}/v1/predict", files=files(IMAGES[:1]))
    assert answer.status_code == 401 and "Bearer" in answer.json()["detail"]
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    # Without the token the page still opens, as a 401, so that it can ask for the token.
    assert 'id="login"' in httpx.get(url).text


def test_model_endpoint(url, fast_model):
    model = httpx.get(f"{url}/v1/model", headers=AUTH).json()
    detector = Detector.load(fast_model)
    assert model["model"] == fast_model.name and model["knnad"] == knnad.__version__
    assert model["thresholds"]["image"] == detector.thresholds_.image
    assert model["settings"]["backbone"] == "mobilenet_v2" and model["frame"] == [224, 224]
    assert model["serve"] == {"batch_size": 4, "queue_size": 6, "max_upload_mb": 1.0,
                              "max_wait_ms": 5.0}


def test_bad_input_gets_4xx_with_one_line(url):
    def post(parts=None, **kwargs):
        answer = httpx.post(f"{url}/v1/predict", files=parts, headers=AUTH, **kwargs)
        detail = answer.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail
        return answer.status_code, detail

    big = np.random.default_rng(0).integers(0, 256, 1_300_000, np.uint8).tobytes()
    status, detail = post([("image", ("big.png", big, "image/png"))])
    assert status == 413 and "over the 1 MiB limit (--max-upload-mb)" in detail
    body = (b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
            + big + b"\r\n--x--\r\n")
    streamed = httpx.post(f"{url}/v1/predict", headers={
        **AUTH, "Content-Type": "multipart/form-data; boundary=x"},
        content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]))
    assert streamed.status_code == 413  # sent in chunks, with no length declared
    assert post(files(IMAGES[:7]))[0] == 413  # more images than the queue holds
    status, detail = post([("image", ("notes.txt", b"not an image", "text/plain"))])
    assert status == 415 and detail.startswith("cannot read image notes.txt: not a decodable")
    assert post(data={"note": "no file"})[0] == 415  # a form without files: urlencoded
    assert post([("note", (None, "text only"))])[0] == 422  # multipart without a file
    assert post(json={"image": "x"})[0] == 415
    strip = png(Image.new("RGB", (300, 1)))
    status, detail = post([("image", ("strip.png", strip, "image/png"))])
    assert status == 422 and detail.startswith("cannot read image strip.png: 300x1 pixels is "
                                               "too elongated")
    floats = png(Image.fromarray(np.full((64, 64), 5.0, np.float32)), "TIFF")
    status, detail = post([("image", ("float.tif", floats, "image/tiff"))])
    assert status == 422 and "outside 0..1" in detail
    broken = httpx.post(f"{url}/v1/predict", headers={
        **AUTH, "Content-Type": "multipart/form-data; boundary=x"}, content=b"no boundary here")
    assert broken.status_code == 400
    assert httpx.post(f"{url}/v1/predict?overlay=perhaps", files=files(IMAGES[:1]),
                      headers=AUTH).status_code == 422
    # None of these counted as a server error.
    assert not [name for name in metrics(url) if 'status="5' in name]


def test_full_queue_gets_503_with_retry_after_then_recovers(url, expected):
    before = metrics(url)
    count = 24
    barrier = threading.Barrier(count)
    answers = [None] * count
    clients = [httpx.Client(headers=AUTH, timeout=60) for _ in range(count)]

    def client(number):
        barrier.wait()
        answers[number] = clients[number].post(f"{url}/v1/predict",
                                               files=files([IMAGES[number % len(IMAGES)]]))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for session in clients:
        session.close()
    busy = [answer for answer in answers if answer.status_code == 503]
    assert busy and all(answer.headers["retry-after"] == "1" for answer in busy)
    assert "the server is busy" in busy[0].json()["detail"]
    for number, answer in enumerate(answers):
        if answer.status_code != 503:
            check_scores(answer, [IMAGES[number % len(IMAGES)]], expected)
    # Load gone: the queue is empty and requests succeed again.
    after = metrics(url)
    assert after["knnad_queue_depth"] == 0
    check_scores(httpx.post(f"{url}/v1/predict", files=files(IMAGES[:6]), headers=AUTH,
                            timeout=60), IMAGES[:6], expected)
    key = 'knnad_requests_total{endpoint="/v1/predict",status="503"}'
    assert after[key] - before.get(key, 0) == len(busy)


def test_metrics_count_requests_latency_and_images(url):
    before = metrics(url)
    httpx.post(f"{url}/v1/predict", files=files(IMAGES[:3]), headers=AUTH, timeout=60)
    httpx.get(f"{url}/v1/model")  # 401
    after = metrics(url)

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert grew('knnad_requests_total{endpoint="/v1/predict",status="200"}') == 1
    assert grew('knnad_requests_total{endpoint="/v1/model",status="401"}') == 1
    assert grew('knnad_requests_total{endpoint="/metrics",status="200"}') == 1  # before's
    assert grew("knnad_images_scored_total") == 3
    assert grew("knnad_predict_duration_seconds_count") == 1
    assert grew('knnad_predict_duration_seconds_bucket{le="+Inf"}') == 1
    assert after["knnad_predict_duration_seconds_sum"] > before.get(
        "knnad_predict_duration_seconds_sum", 0)
    buckets = [value for name, value in after.items() if name.startswith(
        "knnad_predict_duration_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert after["knnad_queue_depth"] == 0


def test_addresses_beyond_loopback_need_a_token(fast_model, monkeypatch, capsys):
    assert all(map(is_loopback, ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "10.1.2.3", "::", "example.com")))
    with pytest.raises(ValueError, match="--token TOKEN .* or --no-auth"):
        ServeSettings(host="0.0.0.0")
    ServeSettings(host="0.0.0.0", token="t")
    ServeSettings(host="0.0.0.0", no_auth=True)
    with pytest.raises(ValueError, match="token must be visible ASCII"):
        ServeSettings(token="two words")
    monkeypatch.delenv("KNNAD_TOKEN", raising=False)
    served = []
    monkeypatch.setattr("knnad.serve.server.serve",
                        lambda model, settings, **kwargs: served.append(settings))
    assert main(["serve", str(fast_model), "--host", "0.0.0.0"]) == 2
    assert "--no-auth" in capsys.readouterr().err and not served
    monkeypatch.setenv("KNNAD_TOKEN", "from-the-environment")
    assert main(["serve", str(fast_model), "--host", "0.0.0.0", "--port", "0"]) == 0
    assert served[-1].token == "from-the-environment" and served[-1].port == 0
    assert main(["serve", str(fast_model), "--no-auth", "--host", "10.0.0.1",
                 "--token", "given", "--queue-size", "9", "--batch-size", "2"]) == 0
    assert (served[-1].token, served[-1].queue_size, served[-1].batch_size) == ("given", 9, 2)
    with pytest.raises(SystemExit) as usage:
        main(["serve", str(fast_model), "--queue-size", "0"])
    assert usage.value.code == 2
    assert "queue_size must be an int >= 1" in capsys.readouterr().err


def in_flight(base, paths):
    """A request of ``paths`` sent to ``base`` from another thread, once its images are
    admitted: the thread, and the dict its ``response`` will be put in."""
    answer = {}
    sender = threading.Thread(target=lambda: answer.update(response=httpx.post(
        f"{base}/v1/predict", files=files(paths), timeout=60)))
    sender.start()
    deadline = time.monotonic() + 30
    while not metrics(base).get("knnad_queue_depth"):
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.01)
    return sender, answer


def test_sigterm_drains_in_flight_requests_and_exits_0(fast_model, expected):
    """``knnad serve`` in its own process: a request of six images, scored one at a time, is in
    flight when SIGTERM comes; it is answered in full, then the process exits with status 0."""
    process = subprocess.Popen([sys.executable, "-m", "knnad.cli", "serve", str(fast_model),
                                "--port", "0", "--batch-size", "1"],
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stderr:  # the port it found is logged
            lines.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            if found:
                break
        else:
            pytest.fail("knnad serve did not start: " + "".join(lines))
        paths = IMAGES[:6]
        sender, answer = in_flight(found.group(1), paths)
        process.send_signal(signal.SIGTERM)
        sender.join()
        check_scores(answer["response"], paths, expected)
        assert process.wait(timeout=60) == 0
        assert "stopped by SIGTERM" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ctrl_c_drains_in_flight_requests_and_the_command_returns_0(fast_model, expected):
    """Ctrl-C (SIGINT to this process, whose main thread runs ``knnad serve``): the request in
    flight is answered in full, and the command returns 0."""
    with listening_socket("127.0.0.1", 0) as probe:  # a free port
        port = probe.getsockname()[1]
    base, paths, answer = f"http://127.0.0.1:{port}", IMAGES[6:12], {}

    def interrupt_once_in_flight():
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    httpx.get(f"{base}/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            sender, sent = in_flight(base, paths)
            answer.update(sent=sent, sender=sender)
        finally:
            signal.raise_signal(signal.SIGINT)

    helper = threading.Thread(target=interrupt_once_in_flight)
    helper.start()
    assert main(["serve", str(fast_model), "--port", str(port), "--batch-size", "1"]) == 0
    helper.join()
    answer["sender"].join()
    check_scores(answer["sent"]["response"], paths, expected)


@pytest.fixture(scope="module")
def genuine(torch_home):
    """The sample's detector with genuine MobileNetV2 weights, calibrated on its good test
    images (all three below the threshold)."""
    sample = demo_root() / "bottle"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(torch_home))
        detector = Detector("mobilenet_v2", weights="IMAGENET1K_V1", progress=False).fit(
            sample / "train" / "good")
    return detector.calibrate(sorted((sample / "test" / "good").iterdir()), quantile=1.0)


def test_page_in_chromium_shows_predicts_scores(genuine, seeded_torch_home, tmp_path):
    """The page at / in the system's chromium: it asks for the token, scores the chosen files
    and shows each score (four decimals; exact in data-score) and label as predict gives them;
    the screenshot goes to docs/images/serve.png."""
    sync_playwright = need_browser()
    paths = []
    for kind, number in [("broken_large", "000"), ("good", "005"), ("contamination", "010"),
                         ("broken_small", "005")]:
        paths.append(tmp_path / f"{kind}_{number}.png")
        paths[-1].write_bytes((demo_root() / "bottle" / "test" / kind / f"{number}.png")
                              .read_bytes())
    prediction = genuine.predict(paths)
    expected = {path.name: (float(score), bool(label)) for path, score, label in
                zip(paths, prediction.image_scores, prediction.labels)}
    assert sorted(label for _, label in expected.values()) == [False, True, True, True]
    model = genuine.save(tmp_path / "bottle.npz")
    with running(create_app(model, token=TOKEN)) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        page = browser.new_page(viewport={"width": 1180, "height": 820})
        page.goto(base)
        page.fill("#token", TOKEN)
        page.press("#token", "Enter")
        page.wait_for_selector("#model b")
        assert "model bottle.npz" in page.text_content("#model")
        page.set_input_files("#files", [str(path) for path in paths])
        page.wait_for_function(f"document.querySelectorAll('.card').length === {len(paths)}")
        shown = page.eval_on_selector_all(".card", "cards => cards.map(card => ["
                                          "card.querySelector('.name').textContent, "
                                          "Number(card.dataset.score), "
                                          "card.querySelector('.score').textContent, "
                                          "card.querySelector('.badge').textContent])")
        assert sorted(name for name, *_ in shown) == sorted(expected)
        for name, score, text, badge in shown:
            assert abs(score - expected[name][0]) <= 1e-6 and text == f"{expected[name][0]:.4f}"
            assert badge == ("anomalous" if expected[name][1] else "normal")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        bottom = page.locator("#results").bounding_box()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True, clip={
            "x": 0, "y": 0, "width": 1180, "height": bottom["y"] + bottom["height"] + 24})
        browser.close()


def test_model_file_is_never_written(fast_model, model_before):
    assert file_state(fast_model) == model_before


def test_served_connections_send_without_nagles_delay():
    """The server's connections have TCP_NODELAY (inherited from its listening socket; asyncio
    does not set it on sockets from socket.create_server): without it every response on a
    kept-alive connection waited 40 ms for the client's delayed ACK."""
    import socket

    from knnad.serve.server import listening_socket

    with listening_socket("127.0.0.1", 0) as server:
        with socket.create_connection(server.getsockname()[:2]):
            connection, _ = server.accept()
            with connection:
                assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_serve_freezes_the_loaded_objects_before_serving(fast_model, monkeypatch):
    """serve() reads the model, then moves every object alive into the collector's permanent
    generation (full collections then skip the model), then serves."""
    from knnad.serve import server as serve_module
    frozen = []
    monkeypatch.setattr(serve_module.uvicorn.Server, "run",
                        lambda self, sockets=None: frozen.append(gc.get_freeze_count()))
    try:
        serve_module.serve(fast_model, ServeSettings(port=0))
    finally:
        gc.unfreeze()
    assert len(frozen) == 1 and frozen[0] > 10_000
