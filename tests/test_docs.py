"""The documentation stays true to the code: generated pages up to date, README short, links resolve.

Fast, no Ray: ``python -m pytest -q tests/test_docs.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from pipeline.commands import docs

REPO = Path(__file__).resolve().parents[1]
README_LIMIT = 12_000  # bytes: what a newcomer reads; the rest belongs in docs/
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)


def test_cli_page_matches_the_parsers():
    page = REPO / "docs" / "cli.md"
    assert page.exists(), "docs/cli.md is missing: run `python -m pipeline.commands.docs > docs/cli.md`"
    assert page.read_text() == docs.cli_markdown(), (
        "docs/cli.md differs from the argument parsers: regenerate it with "
        "`python -m pipeline.commands.docs > docs/cli.md` (or `python -m pipeline.commands.docs --write`)"
    )


def test_cli_page_lists_every_option_of_every_command():
    """Checked against argparse itself, not against the renderer: each sub-command and each option is on the page."""
    from pipeline.cli import build_parser

    text = docs.cli_markdown()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert subparsers.choices, "no sub-commands"
    for name, sub in subparsers.choices.items():
        assert f"## mimicshield {name}\n" in text
        section = text.split(f"## mimicshield {name}\n", 1)[1].split("\n## mimicshield ", 1)[0]
        for action in sub._actions:
            if action.dest == "help":
                continue
            for flag in action.option_strings:
                assert re.search(rf"(?:`|, ){re.escape(flag)}[ `,]", section), f"{name}: {flag} not in docs/cli.md"


@pytest.mark.parametrize("command, common", [
    ("protect", ["--model", "--method", "--eps", "--device"]),
    ("evaluate", ["--clean", "--output", "--model", "--scenario"]),
    ("study", ["--model", "--methods", "--eps", "--purifications"]),
    ("demo", ["--out-dir", "--steps", "--evaluate"]),
])
def test_help_opens_with_the_common_options_and_an_example(command, common, capsys, monkeypatch):
    from pipeline.cli import main

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    usage, summary = text.split("\n\n")[:2]
    assert len(usage.splitlines()) == 1 and all(flag in usage for flag in common)  # one short usage line
    head = text.split("\noptions:\n")[0]  # before the other options and the named groups
    assert f"example:\n  mimicshield {command}" in head
    block = head.split("common options:\n")[1]
    assert [line.split()[0] for line in block.splitlines() if line.startswith("  --")] == common
    groups = re.findall(r"^(\S[^\n]*):$", text.split("\noptions:\n")[1], re.MULTILINE)
    assert groups, "the other options sit in named groups"


def test_cli_markdown_does_not_depend_on_the_terminal(monkeypatch):
    first = docs.cli_markdown()
    monkeypatch.setenv("COLUMNS", "40")
    assert docs.cli_markdown() == first


def test_tables_page_lists_every_schema_with_its_columns():
    page = REPO / "docs" / "tables.md"
    _, generated = docs.split_tables_page(page.read_text())
    assert generated == docs.tables_markdown(), (
        "the generated part of docs/tables.md differs from schemas/*.json: regenerate it with "
        "`python -m pipeline.commands.docs --write`"
    )
    schema_files = sorted((REPO / "schemas").glob("*.json"))
    assert schema_files, "no schemas found"
    for path in schema_files:  # read the JSON directly: the page must show what the files say
        spec = json.loads(path.read_text())
        name = path.stem
        assert f"### `{name}`\n" in generated, f"table {name} missing from docs/tables.md"
        section = generated.split(f"### `{name}`\n", 1)[1].split("\n### ", 1)[0]
        for field in spec["fields"]:
            assert f"| `{field['name']}` | `" in section, f"{name}.{field['name']} missing from docs/tables.md"


def test_readme_stays_short():
    size = len((REPO / "README.md").read_bytes())
    assert size < README_LIMIT, (
        f"README.md is {size} bytes (limit {README_LIMIT}): move detail into docs/ and link to it"
    )


def _doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces to -, repeats -1, -2."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path):
    text = FENCE.sub("", page.read_text())  # links inside code blocks are not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto:, ...
        path, _, anchor = unquote(target).partition("#")
        linked = (page.parent / path) if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: links to missing files or headings: {broken}"


def test_version_and_help_show_what_a_user_types(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("mimicshield ")
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "('" not in text  # no Python None or tuples
    assert "the clean originals, with the same keys (required)" in text
    assert "(default: sdedit,inpaint,textual_inversion,lora)" in text and "(default: 0.1,0.2,0.3,0.5)" in text
    assert "example: mimicshield evaluate" in text
