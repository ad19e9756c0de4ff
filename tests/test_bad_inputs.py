"""The catalogue of issue #13: bad inputs and faults, tried as a new user would.

Every row of :data:`CATALOGUE` names its outcome class, and the one test asserts that class:

* ``refused``: the API raises the right exception type, or the command exits with status 2,
  one error line on stderr and no traceback; and the message names the argument or the path
  AND says what to do (a regular expression per case: a range, a flag, an action);
* ``documented``: the documented result, asserted on values and files (a score scale, an
  orientation, a file mode, the rows of scores.csv, exit status 130 and what is left on disk).

Counts: 135 cases, 108 refused (72 by the API, 36 by the command line) and 27 documented.
``test_counts_in_the_docstring`` keeps the counts above true. By item of the issue (refused /
documented):

    i1 outputs and options checked before the work   21 / 1
    i2 no traceback; Ctrl-C; impossible coresets     12 / 5
    i3 bad files and big runs in batch scoring        6 / 4
    i4 camera images: bit depth, floats, EXIF         6 / 4
    i5 model files                                   19 / 4
    i6 local weights end to end                       3 / 3
    i7 values accepted but wrong                     15 / 4
    i8 knnad demo offline                             1 / 0
    ok the classes already passing                   25 / 2

Case ids start with the item of the issue (``i1`` .. ``i8``) or ``ok`` for the classes the
issue found already passing (NaN rows, wrong dimensions, k out of range, corrupted and hostile
model files, concurrent saves). Cases run in this process except where another process is the
point: Ctrl-C (a real SIGINT to ``python -m knnad.cli``), and files of another account (one
subprocess that drops root to ``nobody``, or runs as the same user where the test is not root;
the same subprocess first runs ``knnad demo`` with a dead network proxy, i.e. offline).
"""
import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from knnad import (
    Detector,
    FlatL2Index,
    ImageLoadError,
    ModelFileError,
    archive,
    coreset,
    covering_radius,
)
from knnad.cli import demo_root, main
from knnad.datasets import BTAD, MVTecAD, dataset_pairs
from knnad.preprocessing import Preprocessor
from knnad.sampling import parse_coreset

REFUSED, DOCUMENTED = "refused", "documented"
SMALL = dict(backbone="mobilenet_v2", layers="coarse", weights=None, image_size=72, crop_size=64,
             progress=False, coreset=None)
NO_BARS = "--no-progress"
SHAPE = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "72", "--crop-size",
         "64", NO_BARS]


# --- images and files --------------------------------------------------------------------------

def textured(count: int, seed: int, size: int = 96):
    """Normal images: a striped texture with noise (PIL RGB)."""
    rng = np.random.default_rng(seed)
    xx = np.mgrid[0:size, 0:size][1]
    base = 128 + 60 * np.sin(xx / 4.0)[..., None] * np.ones(3)
    return [Image.fromarray(np.clip(base + rng.normal(0, 6, (size, size, 3)), 0, 255)
                            .astype(np.uint8)) for _ in range(count)]


def save_all(images, folder: Path, stem: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{stem}{i:03d}.png")
    return folder


def black_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, built without holding its pixels (a 15000 x
    15000 one is 30 kB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    row, compressor = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def as_array(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def run_cli(argv: Sequence[str]):
    """``(status, stdout, stderr)`` of ``knnad argv`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as exit_:  # argparse
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def message_lines(stderr: str):
    """stderr without log records and progress bars: what the command itself printed."""
    segments = re.split(r"[\r\n]+", stderr)
    return [s for s in segments if s.strip() and not re.match(r"(DEBUG|INFO|WARNING) ", s)
            and "%|" not in s and not re.match(r"\s*fit: features|\s*coreset|\s*predict", s)
            and not s.startswith('Downloading: "')]  # torch.hub's own line before a download


def crafted(ctx, name: str, meta_changes: Dict[str, Any] = None, drop_array: Optional[str] = None,
            **array_changes) -> Path:
    """A copy of the fitted model with changed settings or arrays and valid checksums."""
    meta, arrays, _ = archive.read_archive(ctx.model, "Detector", 2)
    arrays = {key: value for key, value in arrays.items() if key != drop_array}
    arrays.update(array_changes)
    meta = {**meta, "params": dict(meta["params"])}
    for key, value in (meta_changes or {}).items():
        if key.startswith("params."):
            meta["params"][key[7:]] = value
        elif value is _DROP:
            meta.pop(key)
        else:
            meta[key] = value
    return archive.write_archive(ctx.tmp / name, "Detector", 2, meta, arrays)


_DROP = object()


# --- the shared state: one tiny fitted model per module ------------------------------------------

class Context:
    """What the cases share (``root``: images, the fitted model) and the case's own ``tmp``."""

    def __init__(self, root: Path):
        self.root = root
        self.images = save_all(textured(6, seed=0), root / "images")
        self.tests = save_all(textured(3, seed=5), root / "tests", stem="test")
        self.image = self.tests / "test000.png"
        self.detector = Detector(**SMALL).fit(self.images)
        previous = os.umask(0o022)
        try:
            self.model = self.detector.save(root / "model.npz")
        finally:
            os.umask(previous)
        (root / "a-file").write_text("not a folder")
        (root / "folder.npz").mkdir()
        Image.new("RGB", (8, 8)).save(root / "picture.npz", format="PNG")
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        (root / "bomb.png").write_bytes(black_png(15000, 15000))
        Image.new("L", (1, 5000)).save(root / "strip.png")
        (root / "clash" / "scores.partial.csv").mkdir(parents=True)  # a folder where predict writes
        self._cache: Dict[str, Any] = {}
        self.extra: Dict[str, str] = {}  # {ro} and {open}, once the other account's run is done
        self.tmp: Path = root
        self.request = None

    def at(self, tmp: Path, request) -> "Context":
        self.tmp, self.request = tmp, request
        return self

    def paths(self) -> Dict[str, str]:
        return {"tmp": str(self.tmp), "root": str(self.root), "images": str(self.images),
                "image": str(self.image), "model": str(self.model), "tests": str(self.tests),
                "missing": str(self.tmp / "no-images-here"), "a_file": str(self.root / "a-file"),
                "folder_npz": str(self.root / "folder.npz"),
                "broken": str(self.root / "broken.png"), "bomb": str(self.root / "bomb.png"),
                "picture": str(self.root / "picture.npz"), **self.extra}

    def fill(self, template: str) -> str:
        return template.format(**self.paths())

    def once(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return Context(tmp_path_factory.mktemp("catalogue"))


# --- the three kinds of case -------------------------------------------------------------------

@dataclass
class Api:
    """Refused by the API: ``action(ctx)`` raises ``error`` whose message holds every string of
    ``names`` (templates of :meth:`Context.paths`) and matches ``advice``; ``then(ctx, error)``
    checks more (that nothing was written, or run)."""

    error: type
    action: Callable[[Context], Any]
    names: Sequence[str]
    advice: str
    then: Optional[Callable[[Context, BaseException], None]] = None
    outcome = REFUSED

    def __call__(self, ctx: Context) -> None:
        with pytest.raises(self.error) as info:
            self.action(ctx)
        message = str(info.value)
        for name in self.names:
            assert ctx.fill(name) in message, (name, message)
        assert re.search(self.advice, message), (self.advice, message)
        assert "Traceback" not in message
        if self.then:
            self.then(ctx, info.value)


def other_account_result(ctx: Context) -> Tuple[int, str, str]:
    """``(status, stdout, stderr)`` of this case's command in the other account's run."""
    return ctx.request.getfixturevalue("other_account")[ctx.request.node.callspec.id]


@dataclass
class Cli:
    """Refused by the command line: ``knnad ARGV`` exits 2 with one line on stderr, no
    traceback, naming ``names`` and matching ``advice``; the paths of ``absent`` do not exist
    afterwards (nothing was written). ``account="other"``: run by another account."""

    argv: str
    names: Sequence[str]
    advice: str
    absent: Sequence[str] = ()
    account: str = "same"
    outcome = REFUSED

    def __call__(self, ctx: Context) -> None:
        if self.account == "other":
            status, _, stderr = other_account_result(ctx)
        else:
            status, _, stderr = run_cli(ctx.fill(self.argv).split())
        assert "Traceback" not in stderr, stderr
        lines = message_lines(stderr)
        assert status == 2 and len(lines) == 1, (status, stderr)
        assert ": error: " in lines[0]
        for name in self.names:
            assert ctx.fill(name) in lines[0], (name, lines[0])
        assert re.search(self.advice, lines[0]), (self.advice, lines[0])
        for path in self.absent:
            assert not Path(ctx.fill(path)).exists(), path


@dataclass
class Doc:
    """A documented result: ``check(ctx)`` asserts it."""

    check: Callable[[Context], None]
    outcome = DOCUMENTED

    def __call__(self, ctx: Context) -> None:
        self.check(ctx)


def case(id: str, spec):
    return pytest.param(spec.outcome, spec, id=id)


# --- documented results (item by item) ----------------------------------------------------------

def predict_skips_and_lists(ctx):
    out = ctx.tmp / "out"
    status, stdout, _ = run_cli(["predict", str(ctx.model), str(ctx.image),
                                 str(ctx.root / "broken.png"), str(ctx.root / "bomb.png"), "--out",
                                 str(out), "--on-error", "skip", "--no-heatmaps", NO_BARS])
    assert status == 3 and "skipped 2 that could not be read" in stdout
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,score,anomalous,status"
    assert [row.split(",")[0::3] for row in rows[1:]] == [
        [str(ctx.image), "scored"], [str(ctx.root / "broken.png"), "skipped"],
        [str(ctx.root / "bomb.png"), "skipped"]]


def crash_keeps_what_was_done(ctx):
    out = ctx.tmp / "out"
    assert run_cli(["predict", str(ctx.model), str(ctx.image), "--out", str(out), NO_BARS])[0] == 0
    previous = (out / "scores.csv").read_bytes()
    status, _, stderr = run_cli(["predict", str(ctx.model), str(ctx.tests),
                                 str(ctx.root / "broken.png"), "--out", str(out), "--batch-size",
                                 "1", NO_BARS])
    (line,) = message_lines(stderr)
    assert status == 2 and "broken.png" in line
    assert f"the 3 images scored before it are in {out / 'scores.partial.csv'}" in line
    rows = (out / "scores.partial.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == [str(p) for p in sorted(ctx.tests.iterdir())]
    assert (out / "scores.csv").read_bytes() == previous  # the previous run's scores stay


def bomb_is_skipped(ctx):
    detector = ctx.detector
    detector.set_params(on_error="skip")
    try:
        prediction = detector.predict([ctx.image, ctx.root / "bomb.png"])
    finally:
        detector.set_params(on_error="raise")
    assert prediction.skipped == [str(ctx.root / "bomb.png")] and len(prediction) == 1


def moderate_aspect_ratio_is_handled(ctx):
    assert Preprocessor(72, 64)(Image.new("RGB", (2000, 100))).shape == (3, 64, 64)  # 20:1


def twelve_bit_data(seed: int, count: int = 4, size: int = 96, defect: bool = False):
    """8-bit images and the same data as 12-bit values in 16-bit PNGs (``defect``: with a
    bright square)."""
    eight = [np.array(image.convert("L")) for image in textured(count, seed, size)]
    for image in eight if defect else ():
        image[30:50, 30:50] = 250
    twelve = [np.round(image.astype(np.float64) * 4095 / 255).astype(np.uint16) for image in eight]
    return [Image.fromarray(image) for image in eight], [Image.fromarray(image) for image in twelve]


def bit_depth_gives_the_score_scale(ctx):
    train8, train12 = twelve_bit_data(seed=1)
    test8, test12 = twelve_bit_data(seed=2, count=2, defect=True)
    save_all(train12, ctx.tmp / "train12"), save_all(test12, ctx.tmp / "test12")
    # 16-bit files
    assert all(np.asarray(Image.open(p)).max() > 255 for p in (ctx.tmp / "test12").iterdir())
    reference = Detector(**SMALL).fit(train8).predict(test8).image_scores
    stated = Detector(**SMALL, bit_depth=12).fit(ctx.tmp / "train12").predict(ctx.tmp / "test12")
    np.testing.assert_allclose(stated.image_scores, reference, rtol=2e-2)
    # Without bit_depth the 12-bit files are read as 16-bit: four bits darker than they are.
    # (bit_depth=16 is that default, stated: the default would also log its once-only warning,
    # which tests/test_preprocessing.py checks.)
    dark = as_array(Preprocessor(72, 64, bit_depth=16)(ctx.tmp / "test12" / "img000.png"))
    right = as_array(Preprocessor(72, 64, bit_depth=12)(ctx.tmp / "test12" / "img000.png"))
    # 8-bit resize rounding
    np.testing.assert_allclose(right, as_array(Preprocessor(72, 64)(test8[0])), atol=0.02)
    assert dark.mean() < right.mean() - 1


def float_images_scaled_by_bit_depth(ctx):
    _, (twelve, *_) = twelve_bit_data(seed=3, count=1)
    path = ctx.tmp / "float.tiff"
    Image.fromarray(np.asarray(twelve, np.float32), mode="F").save(path)
    expected = as_array(Preprocessor(72, 64, bit_depth=12)(twelve))
    np.testing.assert_allclose(as_array(Preprocessor(72, 64, bit_depth=12)(path)), expected,
                               atol=1e-5)
    unit = ctx.tmp / "unit.tiff"  # floats in [0, 1] are taken as they are
    Image.fromarray(np.asarray(twelve, np.float32) / 4095, mode="F").save(unit)
    np.testing.assert_allclose(as_array(Preprocessor(72, 64)(unit)), expected, atol=1e-5)


def exif_orientation_applied(ctx):
    stored = np.random.default_rng(4).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(ctx.tmp / "rotated.png", exif=exif)
    upright = Image.fromarray(stored).transpose(Image.ROTATE_270)
    np.testing.assert_array_equal(as_array(Preprocessor(30, 30)(ctx.tmp / "rotated.png")),
                                  as_array(Preprocessor(30, 30)(upright)))
    assert not np.array_equal(as_array(Preprocessor(30, 30)(ctx.tmp / "rotated.png")),
                              as_array(Preprocessor(30, 30)(Image.fromarray(stored))))


def broken_exif_ignored(ctx):
    image = Image.fromarray(np.full((8, 8, 3), 77, np.uint8))
    image.save(ctx.tmp / "broken_exif.png", exif=b"Exif\x00\x00garbage")
    np.testing.assert_array_equal(as_array(Preprocessor(8, 8)(ctx.tmp / "broken_exif.png")),
                                  as_array(Preprocessor(8, 8)(image)))


def model_mode_follows_umask(ctx):
    for mask, mode in ((0o027, 0o640), (0o022, 0o644), (0o077, 0o600)):
        previous = os.umask(mask)
        try:
            path = ctx.detector.save(ctx.tmp / f"umask{mask:o}.npz")
        finally:
            os.umask(previous)
        assert stat.S_IMODE(path.stat().st_mode) == mode, (oct(mask), oct(path.stat().st_mode))
    assert stat.S_IMODE(ctx.model.stat().st_mode) == 0o644  # the model other accounts read


def replaced_model_keeps_mode(ctx):
    path = ctx.detector.save(ctx.tmp / "model.npz")
    os.chmod(path, 0o600)
    ctx.detector.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def stale_partial_removed(ctx):
    import socket
    host, dead = socket.gethostname().replace(".", "_"), dead_pid()
    stale = ctx.tmp / f".model.npz.{host}.{dead}-0a1b2c3d.knnad-partial"  # a SIGKILLed save's
    kept = [ctx.tmp / f".model.npz.{host}.{os.getpid()}-00000000.knnad-partial",  # a running save
            ctx.tmp / f".model.npz.otherhost.{dead}-0a1b2c3d.knnad-partial",  # another machine's
            ctx.tmp / f".other.npz.{host}.{dead}-0a1b2c3d.knnad-partial",  # another model's
            ctx.tmp / "notes.txt"]
    for path in (stale, *kept):
        path.write_bytes(b"x" * 1000)
    ctx.detector.save(ctx.tmp / "model.npz")
    assert not stale.exists() and all(path.exists() for path in kept)
    assert sorted(p.name for p in ctx.tmp.iterdir() if p.name.endswith("partial")) == sorted(
        p.name for p in kept[:3])


def interrupted_save_leaves_nothing(ctx):
    """A real SIGINT while a big archive is being written: the old file stays whole, and the
    hidden partial file (recognisable by its name) is removed."""
    target = ctx.tmp / "bank.npz"
    archive.write_archive(target, "Test", 1, {}, {"x": np.zeros(3, np.float32)})
    before = target.read_bytes()
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            partials = [p.name for p in ctx.tmp.iterdir() if p.name.endswith(".knnad-partial")]
            if partials:
                seen.extend(partials)
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    interrupted = False
    try:
        archive.write_archive(target, "Test", 1, {}, {"x": np.ones((24, 2**20), np.float32)})
        time.sleep(2)  # a signal that came after the save lands here, and the check below fails
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.set()
        watcher.join()
    assert interrupted and len(seen) == 1, seen
    assert re.fullmatch(r"\.bank\.npz\.[^.]+\.\d+-[0-9a-f]{8}\.knnad-partial", seen[0])
    assert target.read_bytes() == before
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["bank.npz"]


def ctrl_c_as_the_partial_file_appears(ctx):
    """The moment the real SIGINT above may or may not hit: right after the hidden file is
    created, before a byte is written. The file must still go, the old model stay whole."""
    target = ctx.tmp / "bank.npz"
    archive.write_archive(target, "Test", 1, {}, {"x": np.zeros(3, np.float32)})
    before, real_open = target.read_bytes(), os.open

    def open_then_interrupt(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        if str(args[0]).endswith(archive.PARTIAL_SUFFIX):
            os.close(handle)
            raise KeyboardInterrupt
        return handle

    with mock.patch.object(archive.os, "open", open_then_interrupt), \
            pytest.raises(KeyboardInterrupt):
        archive.write_archive(target, "Test", 1, {}, {"x": np.ones(3, np.float32)})
    assert target.read_bytes() == before
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["bank.npz"]


def sigint_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)


def cli_process(args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.Popen([sys.executable, "-m", "knnad.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def ctrl_c_during_predict(ctx):
    out, many = ctx.tmp / "out", save_all(textured(40, seed=7), ctx.tmp / "many", stem="many")
    previous_images = save_all(textured(2, seed=8), ctx.tmp / "previous", stem="previous")
    assert run_cli(["predict", str(ctx.model), str(previous_images), "--out", str(out),
                    NO_BARS])[0] == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert sorted(before) == ["0000_previous000.png", "0001_previous001.png", "report.html",
                              "scores.csv"]
    partial = out / "scores.partial.csv"
    process = cli_process(["predict", str(ctx.model), str(many), "--out", str(out),
                           "--batch-size", "4", NO_BARS])
    sigint_when(process, lambda: partial.exists() and len(partial.read_text().splitlines()) > 1)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    (line,) = message_lines(stderr)
    found = re.fullmatch(r"knnad predict: interrupted; no output written \((\d+) images had been "
                         r"scored; the previous scores.csv is kept\)", line)
    assert found and 4 <= int(found.group(1)) < 40, line
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def ctrl_c_during_fit(ctx):
    many = save_all(textured(30, seed=9, size=160), ctx.tmp / "many")
    model = ctx.tmp / "model.npz"
    process = cli_process(["fit", *[str(many)] * 8, "--model", str(model), "--backbone",
                           "mobilenet_v2", "--weights", "none", "--coreset", "0.5"])
    stderr = []

    def read():
        for chunk in iter(lambda: process.stderr.read(1), ""):
            stderr.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sigint_when(process, lambda: "fit: features" in "".join(stderr))
    process.wait(timeout=60)
    reader.join(timeout=10)
    text = "".join(stderr)
    assert process.returncode == 130 and "Traceback" not in text, text
    assert message_lines(text) == ["knnad fit: interrupted"], text
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["many"]  # no model, no partial file


def ctrl_c_during_evaluate(ctx):
    root, out = ctx.tmp / "mvtec", ctx.tmp / "report"
    root.mkdir(), out.mkdir()
    for category in ("a_bottle", "b_bottle"):  # two categories: interrupted after the first
        (root / category).symlink_to(demo_root() / "bottle", target_is_directory=True)
    (out / "notes.txt").write_text("mine")
    process = cli_process(["evaluate", "--dataset", "mvtec", "--root", str(root), "--out", str(out),
                           "--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "128",
                           "--crop-size", "112", NO_BARS])
    sigint_when(process, lambda: (out / "heatmaps_a_bottle.png").exists())
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert message_lines(stderr) == ["knnad evaluate: interrupted; no report written"], stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # what was there before stays


def bit_flips_caught(ctx):
    data = ctx.model.read_bytes()
    meta, arrays, _ = archive.read_archive(ctx.model, "Detector", 2)
    rng, caught = np.random.default_rng(13), 0
    for bit in rng.choice(len(data) * 8, 200, replace=False):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path = ctx.tmp / "flipped.npz"
        path.write_bytes(bytes(flipped))
        try:
            got_meta, got_arrays, _ = archive.read_archive(path, "Detector", 2)
        except ModelFileError:
            caught += 1
            continue
        # Not refused: then the flip hit bytes that carry nothing (a zip timestamp), and the
        # model read is the saved one, to the bit.
        assert got_meta == meta and all(np.array_equal(got_arrays[k], arrays[k])
                                        for k in arrays), bit
    assert caught >= 190, caught


def concurrent_saves_never_tear(ctx):
    target, errors, stop = ctx.tmp / "shared.npz", [], threading.Event()
    payloads = {i: np.full(100_000, i, np.float32) for i in range(6)}

    def save(i):
        try:
            for _ in range(3):
                archive.write_archive(target, "Test", 1, {"writer": i}, {"x": payloads[i]})
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    def read():
        while not stop.is_set():
            if target.exists():
                meta, arrays, _ = archive.read_archive(target, "Test", 1)  # never torn
                assert np.array_equal(arrays["x"], payloads[meta["writer"]])

    reader = threading.Thread(target=lambda: _collect(read, errors))
    reader.start()
    writers = [threading.Thread(target=save, args=(i,)) for i in payloads]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert not errors, errors
    meta, arrays, _ = archive.read_archive(target, "Test", 1)
    assert np.array_equal(arrays["x"], payloads[meta["writer"]])
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["shared.npz"]


def _collect(function, errors):
    try:
        function()
    except Exception as error:  # noqa: BLE001
        errors.append(error)


def pickle_payload_not_run(ctx, error):
    assert "allow_pickle" not in str(error)  # numpy's advice would run the payload
    assert not (ctx.tmp / "pwned").exists()
    np.load(ctx.tmp / "evil.npz", allow_pickle=True)["memory_bank"]  # what a careless loader does
    assert (ctx.tmp / "pwned").exists()  # so the payload was real


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def evil_model(ctx) -> Path:
    payload = np.empty(1, object)
    payload[0] = _Payload(ctx.tmp / "pwned")
    header = {"kind": "Detector", "format_version": 2, "meta": {}, "sha256": {"memory_bank": "0"}}
    with open(ctx.tmp / "evil.npz", "wb") as handle:
        np.savez(handle, __knnad_meta__=np.frombuffer(json.dumps(header).encode(), np.uint8),
                 memory_bank=payload)
    return Detector.load(ctx.tmp / "evil.npz")


def own_weights(ctx):
    """A model fit with a weight file that is not torchvision's, and that file."""
    def make():
        import torchvision
        weights = ctx.root / "own.pth"
        torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)
        model = Detector(**{**SMALL, "weights": weights}).fit(ctx.images).save(ctx.root / "own.npz")
        return model, weights
    return ctx.once("own_weights", make)


def genuine_copy_predicts_by_name(ctx):
    home = ctx.request.getfixturevalue("seeded_torch_home")
    copy = ctx.tmp / "my-copy-of-mobilenet.pth"  # torchvision's published file, renamed
    shutil.copy(home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth", copy)
    model = ctx.tmp / "genuine.npz"
    assert run_cli(["fit", str(ctx.images), "--model", str(model), "--backbone", "mobilenet_v2",
                    "--weights", str(copy), "--image-size", "72", "--crop-size", "64",
                    "--coreset", "none", NO_BARS])[0] == 0
    copy.unlink()  # predict needs no file: the weights are known by name
    status, stdout, _ = run_cli(["predict", str(model), str(ctx.image), "--out",
                                 str(ctx.tmp / "out"), "--no-heatmaps", NO_BARS])
    assert status == 0 and "scored 1 images" in stdout
    assert Detector.load(model).extractor_.weights_id == "MobileNet_V2_Weights.IMAGENET1K_V1"


def own_weights_given(ctx):
    model, weights = own_weights(ctx)
    out = ctx.tmp / "out"
    status, _, _ = run_cli(["predict", str(model), str(ctx.image), "--out", str(out),
                            "--no-heatmaps", "--weights", str(weights), NO_BARS])
    assert status == 0
    score = float((out / "scores.csv").read_text().splitlines()[1].split(",")[1])
    expected = Detector.load(model, weights=weights).predict([ctx.image]).image_scores[0]
    assert score == pytest.approx(float(expected), abs=1e-5)


def demo_has_weights_option(ctx):
    status, stdout, _ = run_cli(["demo", "--help"])
    assert status == 0 and "--weights" in stdout


def coreset_unique_beyond_distinct_rows(ctx):
    rows = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    picks = coreset(np.concatenate([rows] * 4), n=120, seed=1)  # 50 distinct rows, each 4 times
    assert len(np.unique(picks)) == 120
    assert covering_radius(np.concatenate([rows] * 4), picks[:50]) == 0


def numpy_float32_ratios_accepted(ctx):
    points = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    np.testing.assert_array_equal(coreset(points, ratio=np.float32(0.1), seed=2),
                                  coreset(points, ratio=0.1, seed=2))
    assert parse_coreset(np.float32(0.25)) == 0.25 and parse_coreset(np.int64(7)) == 7
    assert len(coreset(points, n=np.int64(7))) == 7
    detector = Detector(**{**SMALL, "coreset": np.float32(0.5)}).fit(ctx.images)
    assert len(detector.index_) == 6 * 64 // 2


def dataset_pairs_takes_one_name(ctx):
    ((name, train, test),) = dataset_pairs("mvtec", demo_root(), "bottle")
    assert name == "bottle" and len(train) == 16 and len(test) == 12


def metrics_take_bool_and_0_1(ctx):
    from knnad import metrics
    assert metrics.image_auroc([False, True, True, False], [0.1, 0.9, 0.8, 0.2]) == 1.0
    # 3 of 4 pairs
    assert metrics.image_auroc(np.array([0.0, 1.0, 1.0, 0.0]), [0.1, 0.9, 0.2, 0.8]) == 0.75


def other_account_reads_umask_model(ctx):
    status, stdout, stderr = other_account_result(ctx)
    assert status == 0 and "scored 1 images" in stdout, stderr


def predict_refusal_writes_nothing(ctx):
    out = ctx.tmp / "new" / "out"
    status, _, stderr = run_cli(["predict", str(ctx.model), str(ctx.root / "broken.png"), "--out",
                                 str(out), NO_BARS])
    assert status == 2 and "broken.png" in stderr
    assert not (ctx.tmp / "new").exists()  # nothing was scored: no partial file, no folders


# --- the catalogue -----------------------------------------------------------------------------

# An image folder that does not exist: a check after the fit would say so
_BEFORE_WORK = "{missing}"

CATALOGUE = [
    # 1. Fail before the work: outputs and options are checked before fitting or predicting.
    case("i1-fit-model-suffix-pt",
         Cli("fit {missing} --model {tmp}/m.pt", ["{tmp}/m.pt"], r"must end in \.npz")),
    case("i1-fit-model-is-folder", Cli("fit {missing} --model {folder_npz}", ["{folder_npz}"],
                                       r"is a folder; name a file such as")),
    case("i1-fit-model-folder-missing",
         Cli("fit {missing} --model {tmp}/nowhere/m.npz", ["{tmp}/nowhere"],
             "create it first")),
    case("i1-fit-model-read-only-folder",
         Cli("", ["{ro}/m.npz"], "choose another folder or fix its permissions",
             account="other")),
    case("i1-predict-out-is-file", Cli("predict {model} {image} --out {a_file}", ["{a_file}"],
                                       "is a file, not a folder; name a folder")),
    case("i1-predict-out-under-file",
         Cli("predict {model} {image} --out {a_file}/scores", ["{a_file}"],
             "name a folder")),
    case("i1-predict-out-read-only",
         Cli("", ["{ro}"], "choose another folder or fix its permissions",
             account="other")),
    case("i1-evaluate-out-is-file", Cli("evaluate --dataset mvtec --root {missing} --out {a_file}",
                                        ["{a_file}"], "name a folder")),
    case("i1-demo-out-is-file", Cli("demo --out {a_file}/report", ["{a_file}"], "name a folder")),
    case("i1-fit-quantile-2", Cli("fit {missing} --model {tmp}/m.npz --quantile 2", ["--quantile"],
                                  r"in \(0, 1\]")),
    case("i1-fit-quantile-0", Cli("fit {missing} --model {tmp}/m.npz --quantile 0", ["--quantile"],
                                  r"in \(0, 1\]")),
    case("i1-calibrate-quantile-1.5",
         Api(ValueError, lambda ctx: ctx.detector.calibrate([ctx.image], 1.5),
             ["quantile"], r"in \(0, 1\]")),
    case("i1-fit-calibrate-images-missing",
         Cli("fit {images} {broken} --model {tmp}/m.npz --calibrate "
             "{tmp}/held-out " + " ".join(SHAPE), ["{tmp}/held-out"],
             "neither an image file nor a folder", absent=["{tmp}/m.npz"])),
    case("i1-fit-k-above-coreset-count",
         Cli("fit {missing} --model {tmp}/m.npz --coreset 10 --k 50",
             ["k=50", "coreset=10"], "use k <= 10 or a larger coreset")),
    case("i1-api-k-above-coreset-count",
         Api(ValueError, lambda ctx: Detector(**{**SMALL, "coreset": 10}, k=50)
             .fit(ctx.tmp / "no-images-here"), ["k=50"], "use k <= 10")),
    case("i1-api-k-above-bank",
         Api(ValueError, lambda ctx: Detector(**SMALL, k=5000).fit(textured(1, 0)),
             ["k must be"], "use a smaller k or a larger coreset")),
    case("i1-predict-k-above-bank",
         Cli("predict {model} {image} --out {tmp}/out --k 100000", ["--k", "{model}"],
             r"in \[1, 384\].*use a smaller --k", absent=["{tmp}/out"])),
    case("i1-api-predict-k-above-bank",
         Api(ValueError, lambda ctx: Detector.load(ctx.model).set_params(k=385)
             .predict([ctx.image]), ["k must be"], r"in \[1, 384\]")),
    case("i1-fit-sigma-above-map",
         Cli("fit {missing} --model {tmp}/m.npz --crop-size 64 --sigma 100",
             ["sigma=100", "crop_size=64"], r"use sigma < 15\.875 or a larger crop_size")),
    case("i1-api-sigma-above-map", Api(ValueError, lambda ctx: Detector(**SMALL, sigma=16).fit(
        ctx.tmp / "no-images-here"), ["sigma=16"], "or a larger crop_size")),
    case("i1-predict-sigma-above-map",
         Cli("predict {model} {image} --out {tmp}/out --sigma 40", ["sigma=40"],
             "use sigma <", absent=["{tmp}/out"])),
    case("i1-predict-refusal-writes-nothing", Doc(predict_refusal_writes_nothing)),

    # 2. No traceback: file-system errors are one line naming the path and what to do; Ctrl-C is
    #    130 and leaves no partial output; impossible coresets are refused.
    case("i2-fit-images-missing", Cli("fit {tmp}/nothing --model {tmp}/m.npz", ["{tmp}/nothing"],
                                      "neither an image file nor a folder")),
    case("i2-fit-images-unreadable-folder", Cli("", ["{open}/secret"], "check its permissions",
                                                account="other")),
    case("i2-predict-image-unreadable",
         Cli("", ["{open}/locked.png"], "--on-error skip", account="other")),
    case("i2-predict-model-missing",
         Cli("predict {tmp}/absent.npz {image} --out {tmp}/out", ["{tmp}/absent.npz"],
             "check the path")),
    case("i2-predict-model-is-folder",
         Cli("predict {folder_npz} {image} --out {tmp}/out", ["{folder_npz}"],
             "name the .npz file")),
    case("i2-predict-partial-name-is-folder",
         Cli("predict {model} {image} --out {root}/clash", ["scores.partial.csv"],
             "rename it or choose another path")),
    case("i2-evaluate-root-missing", Cli("evaluate --dataset mvtec --root {tmp}/none --out {tmp}/r",
                                         ["{tmp}/none"], "does not exist")),
    case("i2-fit-coreset-inf",
         Cli("fit {missing} --model {tmp}/m.npz --coreset inf", ["coreset", "inf"],
             r"a share of patches in \(0, 1\]")),
    case("i2-fit-coreset-1.5",
         Cli("fit {missing} --model {tmp}/m.npz --coreset 1.5", ["coreset", "1.5"],
             r"a share of patches in \(0, 1\]")),
    case("i2-fit-coreset-0",
         Cli("fit {missing} --model {tmp}/m.npz --coreset 0", ["coreset"],
             "count of patches >= 1")),
    case("i2-fit-coreset-nan",
         Cli("fit {missing} --model {tmp}/m.npz --coreset nan", ["coreset", "nan"],
             "none, a share")),
    case("i2-api-coreset-inf",
         Api(ValueError, lambda ctx: Detector(**{**SMALL, "coreset": float("inf")}).fit(
             ctx.images), ["coreset"], "such as 0.1")),
    case("i2-ctrl-c-during-predict", Doc(ctrl_c_during_predict)),
    case("i2-ctrl-c-during-fit", Doc(ctrl_c_during_fit)),
    case("i2-ctrl-c-during-evaluate", Doc(ctrl_c_during_evaluate)),
    case("i2-ctrl-c-during-save", Doc(interrupted_save_leaves_nothing)),
    case("i2-ctrl-c-as-save-starts", Doc(ctrl_c_as_the_partial_file_appears)),

    # 3. Batch scoring that survives bad files and big runs.
    case("i3-predict-on-error-skip", Doc(predict_skips_and_lists)),
    case("i3-predict-on-error-raise",
         Cli("predict {model} {image} {broken} --out {tmp}/out", ["{broken}"],
             "--on-error skip skips such files")),
    case("i3-predict-on-error-unknown",
         Cli("predict {model} {image} --out {tmp}/out --on-error ignore",
             ["on_error", "ignore"], r"choose one of \('raise', 'skip'\)")),
    case("i3-crash-keeps-what-was-done", Doc(crash_keeps_what_was_done)),
    case("i3-bomb-15000x15000",
         Api(ImageLoadError, lambda ctx: Preprocessor()(ctx.root / "bomb.png"),
             ["{bomb}", "too many pixels"], r"on_error|skip|MAX_IMAGE_PIXELS|smaller")),
    case("i3-bomb-skipped", Doc(bomb_is_skipped)),
    case("i3-predict-bomb",
         Cli("predict {model} {bomb} --out {tmp}/out", ["{bomb}", "too many pixels"],
             "--on-error skip")),
    case("i3-strip-1x5000", Api(ImageLoadError, lambda ctx: Preprocessor()(ctx.root / "strip.png"),
                                ["{root}/strip.png", "1x5000"], "cut it into tiles first")),
    case("i3-strip-in-memory",
         Api(ImageLoadError, lambda ctx: Preprocessor()(Image.new("RGB", (5000, 1))),
             ["in-memory image"], "cut it into tiles first")),
    case("i3-aspect-20-to-1-handled", Doc(moderate_aspect_ratio_is_handled)),

    # 4. Images as industrial cameras write them.
    case("i4-bit-depth-score-scale", Doc(bit_depth_gives_the_score_scale)),
    case("i4-16-bit-beyond-bit-depth",
         Api(ImageLoadError, lambda ctx: Preprocessor(72, 64, bit_depth=12)(
             _saved(ctx, Image.fromarray(np.full((8, 8), 65520, np.uint16)), "sixteen.png")),
             ["{tmp}/sixteen.png", "outside 0..4095"], "set bit_depth=16")),
    case("i4-float-beyond-1", Api(ImageLoadError, lambda ctx: Preprocessor(72, 64)(
        _saved(ctx, Image.fromarray(np.full((8, 8), 4000, np.float32), mode="F"), "f.tiff")),
        ["{tmp}/f.tiff", "outside 0..1"], "set bit_depth=12")),
    case("i4-float-negative", Api(ImageLoadError, lambda ctx: Preprocessor(72, 64)(
        _saved(ctx, Image.fromarray(np.full((8, 8), -0.5, np.float32), mode="F"), "neg.tiff")),
        ["{tmp}/neg.tiff"], r"scale them to \[0, 1\] first")),
    case("i4-float-nan", Api(ImageLoadError, lambda ctx: Preprocessor(72, 64)(
        _saved(ctx, Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F"), "nan.tiff")),
        ["{tmp}/nan.tiff", "NaN"], "repair it first")),
    case("i4-int32-beyond-16-bit", Api(ImageLoadError, lambda ctx: Preprocessor(8, 8)(
        Image.fromarray(np.full((8, 8), 70000, np.int32), mode="I")), ["outside 0..65535"],
                                       r"scale them")),
    case("i4-float-scaled-by-bit-depth", Doc(float_images_scaled_by_bit_depth)),
    case("i4-exif-orientation", Doc(exif_orientation_applied)),
    case("i4-broken-exif-ignored", Doc(broken_exif_ignored)),
    case("i4-bit-depth-17", Cli("fit {missing} --model {tmp}/m.npz --bit-depth 17", ["bit_depth"],
                                r"int in \[1, 16\]")),

    # 5. Model files.
    case("i5-model-mode-follows-umask", Doc(model_mode_follows_umask)),
    case("i5-replaced-model-keeps-mode", Doc(replaced_model_keeps_mode)),
    case("i5-other-account-reads-model", Doc(other_account_reads_umask_model)),
    case("i5-model-unreadable",
         Cli("", ["{open}/secret.npz", "permission denied"], "make it readable",
             account="other")),
    case("i5-stale-partial-removed", Doc(stale_partial_removed)),
    case("i5-model-missing-array", Api(ModelFileError, lambda ctx: Detector.load(
        crafted(ctx, "no_bank.npz", drop_array="memory_bank")), ["no_bank.npz", "memory_bank"],
                                       "fit again")),
    case("i5-model-missing-key", Api(ModelFileError, lambda ctx: Detector.load(
        crafted(ctx, "no_key.npz", {"weights_id": _DROP})), ["no_key.npz", "weights_id"],
                                     "fit again")),
    case("i5-model-missing-param", Api(ModelFileError, lambda ctx: Detector.load(
        crafted(ctx, "no_k.npz", {"params": {}})), ["no_k.npz"], "fit again")),
    case("i5-model-ids-unsorted", Api(ModelFileError, lambda ctx: Detector.load(crafted(
        ctx, "ids.npz", patch_image_ids=np.arange(384)[::-1].copy())),
                                      ["ids.npz", "patch image ids"], "fit again")),
    case("i5-model-bank-float64", Api(ModelFileError, lambda ctx: Detector.load(crafted(
        ctx, "dtype.npz", memory_bank=ctx.detector.index_.vectors().astype(np.float64))),
                                      ["dtype.npz", "float64"],
        "fit again")),
    case("i5-model-bank-nan", Api(ModelFileError, lambda ctx: Detector.load(crafted(
        ctx, "nan.npz", memory_bank=np.where(np.arange(384)[:, None] == 7, np.nan,
                                             ctx.detector.index_.vectors()).astype(np.float32))),
        ["nan.npz", "NaN"], "fit again")),
    case("i5-model-bank-dim-vs-backbone", Api(ModelFileError, lambda ctx: Detector.load(
        crafted(ctx, "dims.npz", {"params.reduce_dim": 64})), ["dims.npz", "128-d", "give 64"],
                                              "fit again")),
    case("i5-model-unknown-setting", Api(ModelFileError, lambda ctx: Detector.load(
        crafted(ctx, "unknown.npz", {"params.colour": "red"})), ["unknown.npz", "colour"],
                                         "upgrade knnad")),
    case("i5-model-invalid-setting", Api(ModelFileError, lambda ctx: Detector.load(
        crafted(ctx, "k3.npz", {"params.k": "three"})), ["k3.npz", "k must be"], "fit again")),
    case("i5-model-malformed-backbone", Api(ModelFileError, lambda ctx: Detector.load(
        crafted(ctx, "backbone.npz", {"params.backbone": 5})), ["backbone.npz", "malformed"],
                                            "fit again")),
    case("i5-model-malformed-calibration", Api(ModelFileError, lambda ctx: Detector.load(crafted(
        ctx, "calibration.npz",
        {"image_threshold": 1.0, "pixel_threshold": 1.0, "calibration_quantile": 0.9,
         "calibration_settings": "k=1"})), ["calibration.npz", "malformed"], "fit again")),
    case("i5-model-threshold-nan", Api(ModelFileError, lambda ctx: Detector.load(crafted(
        ctx, "threshold.npz", {"image_threshold": float("nan"), "pixel_threshold": 1.0,
                               "calibration_quantile": 0.9})), ["threshold.npz"], "fit again")),
    case("i5-model-header-not-object", Api(ModelFileError, lambda ctx: Detector.load(_npz(
        ctx, "header.npz", __knnad_meta__=np.frombuffer(b"[1, 2]", np.uint8))),
                                           ["header.npz", "malformed"],
        "restore it")),
    case("i5-png-as-model", Api(ModelFileError, lambda ctx: Detector.load(ctx.root / "picture.npz"),
                                ["{picture}"],
                                r"not a knnad model file \(not an \.npz archive\)$")),
    case("i5-cli-png-as-model", Cli("predict {picture} {image} --out {tmp}/out", ["{picture}"],
                                    r"not an \.npz archive\)$", absent=["{tmp}/out"])),
    case("i5-zip-without-header",
         Api(ModelFileError, lambda ctx: Detector.load(_npz(ctx, "plain.npz", x=np.zeros(3))),
             ["plain.npz", "no knnad header"], "name a file written by knnad")),
    case("i5-index-as-model", Api(ModelFileError, lambda ctx: Detector.load(_index_file(ctx)),
                                  ["index.npz", "FlatL2Index"], "Detector.save")),
    case("i5-model-future-version", Api(ModelFileError, lambda ctx: Detector.load(
        archive.write_archive(ctx.tmp / "future.npz", "Detector", 99, {}, {})),
                                        ["future.npz", "99"], "upgrade knnad")),

    # 6. Local weights end to end.
    case("i6-genuine-copy-predicts-by-name", Doc(genuine_copy_predicts_by_name)),
    case("i6-predict-needs-own-weights",
         Api(ValueError, lambda ctx: Detector.load(own_weights(ctx)[0]),
             ["own.npz", "sha256:"], r"--weights PATH")),
    case("i6-cli-predict-needs-own-weights",
         Cli("predict {root}/own.npz {image} --out {tmp}/out", ["{root}/own.npz"],
             r"--weights PATH", absent=["{tmp}/out"])),
    case("i6-predict-with-own-weights", Doc(own_weights_given)),
    case("i6-predict-with-other-weights", Api(ValueError, lambda ctx: Detector.load(
        own_weights(ctx)[0], weights=_other_weights(ctx)), ["own.npz", "scores would be wrong"],
                                              "--weights PATH")),
    case("i6-demo-has-weights-option", Doc(demo_has_weights_option)),

    # 7. Values that were accepted but wrong.
    case("i7-sigma-nan",
         Api(ValueError, lambda ctx: Detector(**SMALL, sigma=float("nan")).fit(ctx.images),
             ["sigma"], r">= 0, got nan")),
    case("i7-sigma-inf",
         Api(ValueError, lambda ctx: Detector(**SMALL).set_params(sigma=float("inf")),
             ["sigma"], r">= 0, got inf")),
    case("i7-cli-sigma-nan",
         Cli("predict {model} {image} --out {tmp}/out --sigma nan", ["sigma", "nan"],
             "a number of pixels >= 0")),
    case("i7-index-complex-numpy",
         Api(TypeError, lambda ctx: FlatL2Index.of(np.ones((3, 2), np.complex64)),
             ["vectors", "complex64"], "must hold real numbers")),
    case("i7-index-complex-torch",
         Api(TypeError, lambda ctx: FlatL2Index.of(torch.ones(3, 2, dtype=torch.complex64)),
             ["vectors", "complex64"], "must be real")),
    case("i7-index-complex-query",
         Api(TypeError, lambda ctx: FlatL2Index.of(np.ones((3, 2))).search(
             np.ones((1, 2), np.complex128), 1), ["queries", "complex128"],
             "must hold real numbers")),
    case("i7-index-strings", Api(TypeError, lambda ctx: FlatL2Index.of(np.array([["a", "b"]])),
                                 ["vectors"], "must hold real numbers")),
    case("i7-coreset-unique-beyond-distinct-rows", Doc(coreset_unique_beyond_distinct_rows)),
    case("i7-numpy-float32-ratios", Doc(numpy_float32_ratios_accepted)),
    case("i7-covering-radius-negative-row",
         Api(ValueError, lambda ctx: covering_radius(np.eye(3), [-1]),
             ["selected", "-1"], r"row numbers in \[0, 2\]")),
    case("i7-covering-radius-float-rows",
         Api(ValueError, lambda ctx: covering_radius(np.eye(3), [0.7, 1.2]),
             ["selected", "float64"], r"row numbers in \[0, 2\]")),
    case("i7-covering-radius-row-beyond",
         Api(ValueError, lambda ctx: covering_radius(np.eye(3), [5]),
             ["selected", "5"], r"row numbers in \[0, 2\]")),
    case("i7-btad-int-category",
         Api(ValueError, lambda ctx: BTAD(ctx.tmp, 1), ["BTAD category", "1"],
             "must be a folder name such as '01'")),
    case("i7-mvtec-int-category",
         Api(ValueError, lambda ctx: MVTecAD(demo_root(), 0), ["MVTec AD category"],
             "such as 'bottle'")),
    case("i7-dataset-pairs-one-name", Doc(dataset_pairs_takes_one_name)),
    case("i7-metrics-labels-minus-one",
         Api(ValueError, lambda ctx: _auroc([-1, 1, 1, -1]), ["labels", "-1"],
             "must be 0/1 or bool")),
    case("i7-metrics-labels-strings",
         Api(ValueError, lambda ctx: _auroc(["ok", "ng", "ng", "ok"]), ["labels", "ng"],
             "must be 0/1 or bool")),
    case("i7-metrics-masks-255",
         Api(ValueError, lambda ctx: _auroc([0, 255, 255, 0]), ["labels", "255"],
             "must be 0/1 or bool")),
    case("i7-metrics-bool-and-0-1", Doc(metrics_take_bool_and_0_1)),

    # 8. knnad demo offline.
    case("i8-demo-offline", Cli("", ["mobilenet_v2-b0353104.pth", "{open}/torch/hub/checkpoints"],
                                "--weights PATH", absent=["{open}/demo"], account="other")),

    # Already passing (the 46): NaN rows, wrong dimensions, k out of range, corrupted and
    # hostile model files, concurrent saves; they stay passing.
    case("ok-index-nan-rows",
         Api(ValueError, lambda ctx: FlatL2Index.of(np.array([[0.0, 1], [np.nan, 2], [3, np.inf]])),
             ["vectors", "2 of 3 rows"], "remove or repair those rows")),
    case("ok-index-nan-query",
         Api(ValueError, lambda ctx: FlatL2Index.of(np.eye(2)).search(np.full((1, 2), np.nan), 1),
             ["queries", "1 of 1 rows"], "remove or repair")),
    case("ok-coreset-nan-rows",
         Api(ValueError, lambda ctx: coreset(np.array([[0.0], [np.nan], [1.0]]), ratio=0.5),
             ["features", "1 of 3 rows"], "remove or repair")),
    case("ok-fit-nan-tensor",
         Api(ValueError, lambda ctx: Detector(**SMALL).fit(_nan_batch()), ["fit data"],
             "NaN")),
    case("ok-predict-nan-tensor",
         Api(ValueError, lambda ctx: ctx.detector.predict(_nan_batch()), ["predict data"],
             "NaN")),
    case("ok-index-wrong-dimension",
         Api(ValueError, lambda ctx: FlatL2Index.of(np.eye(3)).add(np.zeros((2, 4))),
             ["vectors has dimension 4"], "the index has dimension 3")),
    case("ok-query-wrong-dimension",
         Api(ValueError, lambda ctx: FlatL2Index.of(np.eye(3)).search(np.zeros((1, 2)), 1),
             ["queries has dimension 2"], "the index has dimension 3")),
    case("ok-index-rank-1",
         Api(ValueError, lambda ctx: FlatL2Index.of(np.zeros(3)), ["vectors"], r"rank 2 \[n, d\]")),
    case("ok-predict-tensor-wrong-shape",
         Api(ValueError, lambda ctx: ctx.detector.predict(torch.zeros(2, 64, 64)),
             ["predict data"], r"float batch \[N, 3, H, W\]")),
    case("ok-k-0",
         Api(ValueError, lambda ctx: Detector(**SMALL, k=0).fit(ctx.images), ["k must be"],
             ">= 1")),
    case("ok-k-float",
         Api(ValueError, lambda ctx: Detector(**SMALL).set_params(k=1.5), ["k must be"], "an int")),
    case("ok-index-k-beyond-size",
         Api(ValueError, lambda ctx: FlatL2Index.of(np.eye(2)).search(np.eye(2), 3),
             ["k must be"], r"in \[1, 2\]")),
    case("ok-image-k-0",
         Api(ValueError, lambda ctx: Detector(**SMALL).set_params(image_k=0), ["image_k"], ">= 1")),
    case("ok-crop-above-image",
         Api(ValueError, lambda ctx: Detector(**SMALL).set_params(crop_size=300),
             ["crop_size=300"], "choose crop_size <= image_size")),
    case("ok-unknown-parameter",
         Api(ValueError, lambda ctx: Detector(**SMALL).set_params(kk=1), ["'kk'"], "valid:")),
    case("ok-model-truncated", Api(ModelFileError, lambda ctx: Detector.load(_written(
        ctx, "cut.npz", ctx.model.read_bytes()[:1000])), ["cut.npz", "truncated"],
                                   "restore it from a good copy")),
    case("ok-model-zeroed-block", Api(ModelFileError, lambda ctx: Detector.load(_written(
        ctx, "zeroed.npz", _zeroed(ctx.model.read_bytes()))), ["zeroed.npz"],
                                      "restore it from a good copy")),
    case("ok-model-text-file",
         Api(ModelFileError, lambda ctx: Detector.load(_written(ctx, "notes.npz", b"hello")),
             ["notes.npz", "not a knnad model file"], "not an .npz archive")),
    case("ok-model-pickle-payload", Api(ModelFileError, evil_model, ["evil.npz", "pickled"],
                                        "never loads.*name a file written by knnad",
                                        then=pickle_payload_not_run)),
    case("ok-model-bit-flips", Doc(bit_flips_caught)),
    case("ok-concurrent-saves", Doc(concurrent_saves_never_tear)),
    case("ok-model-other-backbone",
         Api(ValueError, lambda ctx: Detector.load(ctx.model, backbone="resnet18"),
             ["{model}", "'resnet18'"], "load it without backbone= or fit a new")),
    case("ok-save-suffix",
         Api(ValueError, lambda ctx: ctx.detector.save(ctx.tmp / "m.pt"), ["m.pt"], r"\.npz")),
    case("ok-save-folder-missing",
         Api(FileNotFoundError, lambda ctx: ctx.detector.save(ctx.tmp / "no" / "m.npz"),
             ["{tmp}/no"], "create it first")),
    case("ok-index-file-missing-vectors",
         Api(ModelFileError, lambda ctx: FlatL2Index.load(archive.write_archive(
             ctx.tmp / "idx.npz", "FlatL2Index", 1, {"dim": 3}, {})), ["idx.npz"],
             "save the index again")),
    case("ok-index-file-dim-mismatch",
         Api(ModelFileError, lambda ctx: FlatL2Index.load(archive.write_archive(
             ctx.tmp / "idx.npz", "FlatL2Index", 1, {"dim": 5},
             {"vectors": np.zeros((2, 3), np.float32)})),
             ["idx.npz", "dimension 5"], "save the index again")),
    case("ok-index-file-no-dim",
         Api(ModelFileError, lambda ctx: FlatL2Index.load(archive.write_archive(
             ctx.tmp / "idx.npz", "FlatL2Index", 1, {}, {"vectors": np.zeros((2, 3), np.float32)})),
             ["idx.npz", "dimension None"], "save the index again")),
]


def _saved(ctx, image: Image.Image, name: str) -> Path:
    image.save(ctx.tmp / name)
    return ctx.tmp / name


def _written(ctx, name: str, data: bytes) -> Path:
    (ctx.tmp / name).write_bytes(data)
    return ctx.tmp / name


def _zeroed(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(64) + data[middle + 64:]


def _npz(ctx, name: str, **arrays) -> Path:
    np.savez(ctx.tmp / name, **arrays)
    return ctx.tmp / name


def _index_file(ctx) -> Path:
    FlatL2Index.of(np.eye(3)).save(ctx.tmp / "index.npz")
    return ctx.tmp / "index.npz"


def _other_weights(ctx) -> Path:
    import torchvision
    path = ctx.tmp / "other.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    return path


def _auroc(labels):
    from knnad import metrics
    return metrics.image_auroc(np.array(labels), [0.1, 0.9, 0.8, 0.2])


def _nan_batch() -> torch.Tensor:
    batch = torch.zeros(2, 3, 64, 64)
    batch[1, 0, 5, 5] = float("nan")
    return batch


# --- cases run by another account (and offline), in one subprocess --------------------------------

_OTHER_ACCOUNT_ARGV = {
    "i1-fit-model-read-only-folder": "fit {missing} --model {ro}/m.npz",
    "i1-predict-out-read-only": "predict {model} {image} --out {ro}/scores --no-heatmaps",
    "i2-fit-images-unreadable-folder": "fit {open}/secret --model {open}/m.npz",
    "i2-predict-image-unreadable": "predict {model} {open}/locked.png --out {open}/locked-out "
                                   "--no-heatmaps",
    "i5-model-unreadable": "predict {open}/secret.npz {image} --out {open}/secret-out",
    "i5-other-account-reads-model": "predict {model} {image} --out {open}/readable-out "
                                    "--no-heatmaps",
}
_OFFLINE_ARGV = {"i8-demo-offline": "demo --out {open}/demo --no-progress"}

_ACCOUNT_SCRIPT = r"""
import contextlib, io, json, logging, os, sys, traceback
logging.basicConfig(stream=sys.__stderr__)  # knnad's own basicConfig then leaves stderr alone
import knnad.cli, knnad.report, knnad.plots  # all that the commands import, while root can read it
from knnad.cli import main

def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
        except BaseException:
            status = None
            err.write(traceback.format_exc())
    return [status, out.getvalue(), err.getvalue()]

warm_up, offline, cases = json.loads(sys.argv[1])
run(warm_up)  # decode, score and draw once before the privileges go
results = {name: run(argv) for name, argv in offline.items()}
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)  # nobody: another account
results.update({name: run(argv) for name, argv in cases.items()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def other_account(shared):
    """``{case id: (status, stdout, stderr)}`` of the cases run by another account and offline.

    Root drops to ``nobody`` after loading what the commands need; a user that is not root
    runs them itself (the modes below then refuse it the same way)."""
    base = Path(tempfile.mkdtemp(prefix="knnad-accounts-"))
    os.chmod(base, 0o755)
    opened, read_only = base / "open", base / "ro"
    opened.mkdir(mode=0o777), read_only.mkdir()
    os.chmod(opened, 0o777)
    model = shutil.copy2(shared.model, base / "model.npz")  # 0644: the umask's mode, kept
    image = shutil.copy2(shared.image, base / "test.png")
    secret_images = save_all(textured(2, seed=11), opened / "secret")
    shutil.copy2(shared.model, opened / "secret.npz")
    shutil.copy2(shared.image, opened / "locked.png")
    (opened / "torch").mkdir(mode=0o777)
    paths = {"ro": str(read_only), "open": str(opened), "model": str(model), "image": str(image),
             "missing": str(base / "no-images-here")}
    os.chmod(opened / "secret.npz", 0o000), os.chmod(opened / "locked.png", 0o000)
    os.chmod(secret_images, 0o000), os.chmod(read_only, 0o555)
    try:
        job = json.dumps([
            ["predict", str(model), str(image), "--out", str(opened / "warm-up"), NO_BARS],
            {name: t.format(**paths).split() for name, t in _OFFLINE_ARGV.items()},
            {name: (t.format(**paths) + " " + NO_BARS).split()
             for name, t in _OTHER_ACCOUNT_ARGV.items()}])
        dead = "http://127.0.0.1:9"  # a closed port: no network, at once
        env = {**os.environ, "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(opened), "HOME": str(opened),
               "TORCH_HOME": str(opened / "torch"), "https_proxy": dead, "HTTPS_PROXY": dead,
               "http_proxy": dead, "HTTP_PROXY": dead, "no_proxy": "", "NO_PROXY": ""}
        done = subprocess.run([sys.executable, "-c", _ACCOUNT_SCRIPT, job], env=env, cwd=str(base),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results = json.loads(done.stdout.splitlines()[-1])
    finally:
        for path in (opened / "secret.npz", opened / "locked.png", secret_images, read_only):
            os.chmod(path, 0o755)
    shared.extra = {"ro": paths["ro"], "open": paths["open"]}
    yield results
    shutil.rmtree(base, ignore_errors=True)


# --- the test ----------------------------------------------------------------------------------

@pytest.mark.parametrize("outcome, spec", CATALOGUE)
def test_catalogue(outcome, spec, shared, tmp_path, request):
    ctx = shared.at(tmp_path, request)
    if getattr(spec, "account", "") == "other":
        request.getfixturevalue("other_account")  # sets the paths {ro} and {open}
    spec(ctx)


def test_counts_in_the_docstring():
    specs = [param.values[1] for param in CATALOGUE]
    refused = [spec for spec in specs if spec.outcome == REFUSED]
    api = sum(isinstance(spec, Api) for spec in refused)
    documented = len(specs) - len(refused)
    expected = (f"Counts: {len(specs)} cases, {len(refused)} refused ({api} by the API, "
                f"{len(refused) - api} by the command line) and {documented} documented.")
    assert expected in __doc__, expected
    for item in sorted({param.id.split("-")[0] for param in CATALOGUE}):
        outcomes = [param.values[0] for param in CATALOGUE if param.id.startswith(item + "-")]
        row = rf"\n    {item} .*\s{outcomes.count(REFUSED)} / {outcomes.count(DOCUMENTED)}\n"
        assert re.search(row, __doc__), row
    ids = [param.id for param in CATALOGUE]
    assert len(set(ids)) == len(ids)
    assert set(_OTHER_ACCOUNT_ARGV) | set(_OFFLINE_ARGV) == {
        param.id for param in CATALOGUE if getattr(param.values[1], "account", "") == "other"} | {
        "i5-other-account-reads-model"}
