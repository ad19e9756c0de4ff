"""Reference pages that the code itself defines, generated at build time by mkdocs-gen-files
(mkdocs.yml) so that they never go stale:

- ``reference/cli.md``: ``knnad --help`` and every ``knnad COMMAND --help``, from
  :func:`knnad.cli.build_parser`;
- ``reference/detector.md``: :class:`knnad.Detector` (its docstrings, by mkdocstrings) and its
  parameter table from :data:`knnad.options.OPTIONS` and the defaults of ``Detector.__init__``,
  the sources of ``help(knnad.Detector)`` and of the command line's detector flags.

Unlike the rest of the API reference (read from the source by griffe), these import knnad, and
so torch: the docs build needs knnad installed with its dependencies, as CI has it.
"""
from __future__ import annotations

import argparse
import os

import mkdocs_gen_files

from knnad.cli import build_parser
from knnad.detector import Detector
from knnad.options import OPTIONS, defaults

os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal's width (read when it formats)
os.environ["NO_COLOR"] = "1"


def cli_page() -> str:
    parser = build_parser()
    parser.prog = "knnad"
    text = ["# Command-line reference", "",
            ("Generated from `knnad.cli.build_parser` when this site was built: the output of "
             "`knnad --help` and of `knnad COMMAND --help` for each command. The guide to the "
             "commands, with examples, is [Command line](../guide/cli.md)."), "",
            "```text", parser.format_help().rstrip(), "```", ""]
    for name, command in subcommands(parser).items():
        text += [f"## knnad {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(text)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def subcommands(parser: argparse.ArgumentParser) -> dict:
    return next(action for action in parser._actions
                if isinstance(action, argparse._SubParsersAction)).choices


def detector_page() -> str:
    fit = subcommands(build_parser())["fit"]
    flags = {action.dest: ", ".join(f"`{flag}`" for flag in action.option_strings)
             for action in fit._actions if action.option_strings}
    rows = ["| parameter | `knnad fit` flag | default | new fit when changed (*) | meaning |",
            "|---|---|---|---|---|"]
    for name, default in defaults(Detector).items():
        option = OPTIONS[name]
        rows.append(f"| `{name}` | {flags.get(name, '–')} | `{default!r}` | "
                    f"{'yes *' if option.refit else 'no'} | {cell(option.help)} |")
    return "\n".join([
        "# Detector", "",
        "`knnad.Detector` (defined in `knnad.detector`).", "",
        "## Parameters", "",
        ("Generated from `knnad.options.OPTIONS` and the defaults of `Detector.__init__` when "
         "this site was built; the same text is in `help(knnad.Detector)` and in the detector "
         "flags of `knnad fit` and `knnad evaluate` ([command-line reference](cli.md)). A "
         "parameter that needs a new fit (marked * in `help(knnad.Detector)` and below) builds "
         "the fitted parts: changed after fit, `predict`, `calibrate` and `save` refuse until "
         "the next fit. The others apply at the next `predict` and are saved as set."), "",
        *rows, "",
        "## API", "",
        "::: knnad.detector.Detector",
        "    options:",
        "      show_root_heading: true",
        "      heading_level: 3",
        ""])


with mkdocs_gen_files.open("reference/cli.md", "w") as handle:
    handle.write(cli_page())
mkdocs_gen_files.set_edit_path("reference/cli.md", "knnad/cli.py")
with mkdocs_gen_files.open("reference/detector.md", "w") as handle:
    handle.write(detector_page())
mkdocs_gen_files.set_edit_path("reference/detector.md", "knnad/options.py")
