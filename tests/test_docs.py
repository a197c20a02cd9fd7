"""The documentation stays true to the tree: every relative link in README.md, docs/*.md,
python/README.md and bench/README.md resolves (anchors too); every repository path they mention
(``python/...``, ``scripts/...``, ``bench/...``, ``docs/...``, ``tests/...``, ``ann_kernels/...``,
``csrc/...``) exists; every docs page is listed in README.md; and every ``ann-kernels`` command in
their code blocks names a real subcommand and real options (the examples themselves run in
tests/test_examples.py)."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", ROOT / "python" / "README.md", ROOT / "bench" / "README.md",
                    *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Folders the documented commands create (outputs), not part of the tree.
OUTPUT_DIRS = ("bench/results/",)
PATH = re.compile(r"(?<![\w./~-])((?:python|scripts|bench|docs|tests|ann_kernels|csrc)/[\w.*/<>-]*[\w*/])")


def github_slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {github_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+?)\s*#*$", text, flags=re.M)}


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
            bad.append(f"{target} (no such file {shown})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading with anchor #{anchor} in {dest.name})")
    return bad


def missing_paths(path: Path) -> list[str]:
    bad = []
    for mention in sorted(set(PATH.findall(path.read_text()))):
        if "<" in mention:  # a placeholder such as bench/results/<bench>/
            mention = mention.split("<")[0]
        mention = mention.rstrip(".")
        if mention.startswith(OUTPUT_DIRS):
            continue
        if not (list(ROOT.glob(mention.rstrip("/"))) if "*" in mention else (ROOT / mention).exists()):
            bad.append(mention)
    return bad


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    assert not broken_links(doc), f"{doc.relative_to(ROOT)}: broken links: {broken_links(doc)}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_mentioned_paths_exist(doc):
    missing = missing_paths(doc)
    assert not missing, f"{doc.relative_to(ROOT)} mentions paths that do not exist: {missing}"


def test_readme_lists_every_docs_page():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in LINK.findall(readme.read_text())}
    unlisted = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlisted, f"docs pages not linked from README.md's Documentation list: {unlisted}"


# ------------------------------------------------------------------ the CLI commands in the docs


def cli_commands(text: str) -> list[str]:
    """Each ``ann-kernels ...`` / ``python -m ann_kernels ...`` line of the fenced code blocks,
    continuation lines joined, comments and ``[optional]`` brackets dropped."""
    commands = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            for part in re.split(r"\s*(?:&&|;)\s*|\s+\|\s+", line):
                match = re.match(r"(?:ann-kernels|python -m ann_kernels)\s+(.*)", part)
                if match:
                    commands.append(match.group(1))
    return commands


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def unknown_cli_words(command: str, parser: argparse.ArgumentParser) -> list[str]:
    """The subcommands and ``--options`` of ``command`` (the words after ``ann-kernels``) that
    the parser does not have."""
    words = shlex.split(re.sub(r"[\[\]]", " ", command).replace("|", " "))
    bad, path = [], []
    while words and not words[0].startswith("-") and _subcommands(parser):
        name = words.pop(0)
        subs = _subcommands(parser)
        if name not in subs:
            return [f"subcommand {' '.join(path + [name])!r}"]
        parser, path = subs[name], path + [name]
    for word in words:
        option = word.split("=")[0]
        if option.startswith("--") and option not in parser._option_string_actions:
            bad.append(f"{' '.join(path)} {option}")
    return bad


def test_cli_commands_in_the_docs_exist():
    from ann_kernels.cli import build_parser

    parser = build_parser()
    found, bad = 0, []
    for doc in DOC_FILES:
        for command in cli_commands(doc.read_text()):
            found += 1
            bad += [f"{doc.relative_to(ROOT)}: ann-kernels {command}: unknown {w}"
                    for w in unknown_cli_words(command, parser)]
    assert found >= 10, f"only {found} ann-kernels commands found in the docs: the scan is broken"
    assert not bad, "\n".join(bad)


SCRIPT_COMMAND = re.compile(r"python3? ((?:bench|scripts|python)/[\w/]+\.py)((?:[ \t]+[^\s`#|;&]+)*)")


def script_options(script: Path) -> set[str]:
    """The ``--options`` a script's argparse knows: string literals starting with ``--`` in its
    ``add_argument`` calls and in those of the repository modules it imports (``bench.common``)."""
    import ast

    options, todo, seen = set(), [script], set()
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                options |= {a.value for a in node.args
                            if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                    "bench", "scripts"):
                todo.append(ROOT / (node.module.replace(".", "/") + ".py"))
    return options


def unknown_script_options(text: str) -> list[str]:
    """``--options`` given to a repository script (``python bench/x.py --quick``) in code blocks or
    inline code that the script does not define."""
    spans = FENCE.findall(text) + re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    bad = []
    for span in spans:
        for match in SCRIPT_COMMAND.finditer(re.sub(r"\s*\\\n\s*", " ", span)):
            script = ROOT / match.group(1)
            if not script.is_file():
                continue  # reported by test_mentioned_paths_exist
            known = script_options(script)
            words = match.group(2).split()
            if "--" in words:  # what follows is for a program the script runs (e.g. pytest)
                words = words[:words.index("--")]
            bad += [f"{match.group(1)} {w.split('=')[0]}" for w in words
                    if w.startswith("--") and w.split("=")[0] not in known]
    return bad


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_options_in_the_docs_exist(doc):
    bad = unknown_script_options(doc.read_text())
    assert not bad, f"{doc.relative_to(ROOT)}: options the scripts do not have: {bad}"


# ------------------------------------------------------------------ the checks catch what they are for


def test_the_checks_catch_a_broken_doc(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "real.sh").write_text("")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "common.py").write_text("def add(p):\n    p.add_argument('--device')\n")
    (tmp_path / "bench" / "b.py").write_text("from bench.common import add\nimport argparse\n"
                                             "p = argparse.ArgumentParser()\np.add_argument('--quick')\n")
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A `code` heading, here\n")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text("[ok](other.md) [ok](other.md#a-code-heading-here) [bad](missing.md) "
                   "[bad anchor](other.md#nowhere) [web](https://example.com/x.md)\n"
                   "Run `scripts/real.sh`, then scripts/gone.sh and python/*.py.\n"
                   "```bash\nann-kernels train --epochs 1 \\\n    --no-such-flag 3   # comment --ignored\n"
                   "ann-kernels nosuch --x\n```\n"
                   "Then `python bench/b.py --quick --device cpu --quik` and `python scripts/real.sh --x`.\n")
    assert broken_links(doc) == ["missing.md (no such file docs/missing.md)",
                                 "other.md#nowhere (no heading with anchor #nowhere in other.md)"]
    assert missing_paths(doc) == ["python/*.py", "scripts/gone.sh"]
    assert unknown_script_options(doc.read_text()) == ["bench/b.py --quik"]
    from ann_kernels.cli import build_parser

    commands = cli_commands(doc.read_text())
    assert commands == ["train --epochs 1 --no-such-flag 3", "nosuch --x"]
    assert unknown_cli_words(commands[0], build_parser()) == ["train --no-such-flag"]
    assert unknown_cli_words(commands[1], build_parser()) == ["subcommand 'nosuch'"]
