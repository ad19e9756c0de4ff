"""Benchmark pages, generated at build time by mkdocs-gen-files (mkdocs.yml) so that they never
go stale: one page per ``benchmarks/results/*.md``, as the script wrote it, under a provenance
note (the results file, the script that writes it and its description, the machine and code it
was measured with, the last commit that changed the file), its JSON beside it and any plot of
the same name; plus ``benchmarks/SUMMARY.md``, this section's navigation (mkdocs-literate-nav).

Reads files only (the scripts' docstrings by ``ast``): nothing is imported or run.
"""
from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRIPTS = ROOT / "benchmarks"
OUT = Path("benchmarks")  # the section's folder in the site
#: Results files not written by ``bench_<name>.py``.
WRITERS = {"gpu_install": "check_gpu_install.sh"}


def git(*args: str) -> str:
    """Output of a git command in the repository, or "" where git or the history is missing."""
    try:
        return subprocess.run(("git", *args), cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def writer(stem: str) -> Path:
    """The script that writes ``results/<stem>.md``: ``bench_<name>.py`` for ``<name>-...``."""
    name = stem.split("-")[0]
    return SCRIPTS / WRITERS.get(name, f"bench_{name}.py")


def description(script: Path) -> str:
    """The first paragraph of the script's docstring (of its leading comment for a shell script)."""
    if not script.exists():
        return ""
    text = script.read_text(encoding="utf-8")
    if script.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
    else:  # the comment block under the shebang, up to its first empty comment line
        block = []
        for line in text.splitlines()[1:]:
            if not line.startswith("#") or not line[1:].strip():
                break
            block.append(line[1:].strip())
        doc = "\n".join(block)
    return " ".join(doc.split("\n\n")[0].split()).replace("<", "&lt;")


def machine_table(line: str) -> str:
    """The ``Machine: {...}`` line of a results file as a two-column table."""
    try:
        machine = json.loads(line.split(":", 1)[1])
    except (IndexError, ValueError):
        return f"`{line.strip()}`\n"
    if "git_commit" not in machine:
        machine["git_commit"] = "not recorded (results files record it since commit aaa7bb7)"
    rows = "".join(f"| {key} | {'–' if value is None else value} |\n"
                   for key, value in machine.items())
    return "| recorded | value |\n|---|---|\n" + rows


def page(source: Path) -> str:
    """The page of one results file: its title, the provenance note, then the file's text."""
    lines = source.read_text(encoding="utf-8").splitlines()
    title = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("# ") else source.stem
    body = lines[1:] if lines and lines[0].startswith("# ") else lines
    machine = next((line for line in body if line.startswith("Machine: ")), None)
    body = [line for line in body if line is not machine]
    script = writer(source.stem)
    relative = source.relative_to(ROOT).as_posix()
    last = git("log", "-1", "--format=%h (%cs)", "--", relative)
    dirty = git("status", "--porcelain", "--", relative)
    note = ['!!! info "Provenance"',
            f"    - File: `{relative}`"
            + (f" ([JSON]({source.stem}.json))" if source.with_suffix(".json").exists() else "")]
    if script.exists():
        note.append(f"    - Written by `{script.relative_to(ROOT).as_posix()}`: "
                    f"{description(script)}")
    note.append(f"    - Last changed in commit {last}" if last else
                "    - Last commit: unknown (no git history where the site was built)")
    if dirty:
        note.append("    - The working tree holds uncommitted changes to this file.")
    text = f"# {title}\n\n" + "\n".join(note) + "\n\n"
    if machine:
        text += "## Machine\n\n" + machine_table(machine) + "\n"
    text += "\n".join(body).strip() + "\n"
    plot = source.with_name(source.stem.split("-")[0] + ".png")
    if plot.exists():
        text += f"\n## Plot\n\n![{plot.name}]({plot.name})\n"
    return text


def main() -> None:
    nav = ["* [Overview](index.md)"]
    for source in sorted(RESULTS.glob("*.md")):
        with mkdocs_gen_files.open(OUT / source.name, "w") as handle:
            handle.write(page(source))
        mkdocs_gen_files.set_edit_path(OUT / source.name, source.relative_to(ROOT))
        plot = source.with_name(source.stem.split("-")[0] + ".png")
        for extra in (source.with_suffix(".json"), plot):
            if extra.exists():
                with mkdocs_gen_files.open(OUT / extra.name, "wb") as handle:
                    handle.write(extra.read_bytes())
        nav.append(f"* [{source.stem}]({source.name})")
    with mkdocs_gen_files.open(OUT / "SUMMARY.md", "w") as handle:
        handle.write("\n".join(nav) + "\n")


main()
