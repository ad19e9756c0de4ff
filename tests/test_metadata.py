"""The package's metadata says what it ships and what its code needs (issue #21)."""
import re
from pathlib import Path

import pytest

from knnad import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_licence_names_the_sample_s_licence_too(project):
    """The wheel ships the MVTec AD bottle sample, CC BY-NC-SA 4.0, beside knnad's MIT code."""
    assert project["license"] == "MIT AND CC-BY-NC-SA-4.0"
    assert "knnad/data/mvtec_bottle_sample/LICENSE.txt" in project["license-files"]
    assert "CC BY-NC-SA 4.0" in (ROOT / "knnad/data/mvtec_bottle_sample/NOTICE.md").read_text()


def test_the_floors_are_those_the_code_needs(project):
    """torch.onnx.export of an ExportedProgram with dynamo=True (knnad.deploy.export) needs
    torch 2.5; np.trapezoid (the tests) numpy 2, and so the first numpy 2 builds of the compiled
    packages."""
    floors = dict(re.fullmatch(r"([\w-]+)>=([\d.]+)", requirement).groups()
                  for requirement in project["dependencies"])
    assert "dynamo=True" in (ROOT / "knnad/deploy/export.py").read_text()
    assert "np.trapezoid" in (ROOT / "tests/test_metrics.py").read_text()
    needed = {"torch": (2, 5), "torchvision": (0, 20), "numpy": (2, 0), "faiss-cpu": (1, 9),
              "scikit-learn": (1, 4, 2), "scipy": (1, 13), "matplotlib": (3, 8, 4)}
    for name, minimum in needed.items():
        assert tuple(int(part) for part in floors[name].split(".")) >= minimum, (name, floors[name])


def test_the_demo_says_what_the_sample_s_licence_allows(tmp_path, capsys, monkeypatch):
    """knnad demo prints the sample's licence and its terms after its report (the report itself
    is stubbed here: test_cli runs the real demo)."""
    from knnad import report

    def fake_report(pairs, params, out, **options):
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("# report\n")

    monkeypatch.setattr(report, "evaluate_and_report", fake_report)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"CC BY-NC-SA 4\.0.*non-commercial use only.*crediting MVTec.*same licence.*"
                     r"NOTICE\.md", printed.replace("\n", " "))
