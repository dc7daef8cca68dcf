"""The documentation holds together: a README a newcomer finishes, links that resolve, commands that
match CI and the real command line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 10_000
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def split_code(text: str) -> tuple[list[str], list[list[str]]]:
    """The lines outside fenced code blocks, and each fenced block's lines."""
    prose: list[str] = []
    blocks: list[list[str]] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
        elif block is None:
            prose.append(line)
        else:
            block.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return "".join("-" if ch == " " else ch for ch in text if ch.isalnum() or ch in " -_")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in split_code(path.read_text())[0]:
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    prose = "\n".join(split_code(path.read_text())[0])
    prose = INLINE_CODE.sub("", prose)
    return [t for t in LINK.findall(prose) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: {target}"
        if not dest.exists():
            problems.append(f"{where} (no such file)")
        elif ROOT not in dest.parents and dest != ROOT:
            problems.append(f"{where} (outside the repository)")
        elif anchor:
            if dest.suffix != ".md":
                problems.append(f"{where} (anchor into a file that is not Markdown)")
            elif anchor not in anchors(dest):
                problems.append(f"{where} (no heading with this anchor in {dest.relative_to(ROOT)})")
    return problems


def shell_commands(block: list[str]) -> list[str]:
    """Command lines of a shell block: comments dropped, backslash continuations joined."""
    out, current = [], ""
    for line in block:
        line = line.strip()
        if current:
            line = current + " " + line
            current = ""
        if line.endswith("\\"):
            current = line[:-1].strip()
            continue
        if line and not line.startswith("#"):
            out.append(line)
    return out


def ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines
            if line.strip() and not line.startswith("#") and not re.match(r"(set|cd)\b", line.strip())]


def two_commands(path: Path) -> list[str]:
    """The shell commands of the first code block after the "The two commands" heading (or, without
    that heading, of the page's first code block)."""
    text = path.read_text()
    marker = re.search(r"^#+ The two commands\s*$", text, flags=re.M)
    blocks = split_code(text[marker.end():] if marker else text)[1]
    assert blocks, f"{path.relative_to(ROOT)}: no code block with the install and test commands"
    return shell_commands(blocks[0])


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (f"README.md is {size} bytes (limit {README_MAX_BYTES}): move details to docs/ or "
                                      "benchmarks/README.md and link them")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.exists(), page
    assert not broken_links(page), "\n".join(broken_links(page))


def test_every_page_is_reachable_from_the_readme():
    reachable, todo = set(), [README]
    while todo:
        page = todo.pop()
        if page in reachable:
            continue
        reachable.add(page)
        for target in relative_links(page):
            dest = (page.parent / target.partition("#")[0]).resolve()
            if dest.suffix == ".md" and dest.is_file():
                todo.append(dest)
    missing = [str(p.relative_to(ROOT)) for p in PAGES if p.resolve() not in reachable]
    assert not missing, f"pages no link from README.md leads to: {missing}"


def test_readme_install_and_test_commands_are_what_ci_runs():
    """.ci/run is `bash install.sh` then the test command; the README's two commands are exactly those
    (the first continues with the offline example), and docs/install.md shows the same two."""
    ci = ci_commands()
    assert ci == ["bash install.sh", ".venv/bin/python -m pytest -q"], f".ci/run changed: {ci}; update this test and the README"
    readme = two_commands(README)
    assert len(readme) == 2, readme
    install, test = readme
    assert install == ci[0] or install.startswith(ci[0] + " && "), install
    assert test == ci[1], test
    assert ". .venv/bin/activate" in install.split(" && "), "the example runs tmerge from the venv install.sh makes"
    assert two_commands(ROOT / "docs" / "install.md") == readme
    script = (ROOT / "install.sh").read_text()
    assert re.search(r"-m venv \.venv\b", script), "install.sh no longer makes ./.venv, which the README's commands use"
    assert re.search(r'pip install[^\n]*-e "\.\[dev\]"', script), "install.sh no longer installs the test tools (dev extra)"


def tmerge_invocations(page: Path) -> list[list[str]]:
    """Every `tmerge COMMAND ...` in the page's shell blocks and inline code, as argument lists."""
    prose, blocks = split_code(page.read_text())
    lines = [line for block in blocks for line in shell_commands(block)]
    lines += [m.group(2) for line in prose for m in INLINE_CODE.finditer(line)]
    out = []
    for line in lines:
        for m in re.finditer(r"(?:^|[\s$(])tmerge\s+([a-z][a-z-]*)\b([^#|;&]*)", line):
            try:
                args = shlex.split(m.group(2))
            except ValueError:
                args = m.group(2).split()
            out.append([m.group(1), *args])
    return out


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_and_options_exist(page):
    """Each `tmerge COMMAND --option` shown in the README and docs/ names a real command and options it has."""
    from tmerge.cli.app import _register_commands, app

    import typer.main

    _register_commands()
    commands = typer.main.get_command(app).commands
    problems = []
    for command, *args in tmerge_invocations(page):
        if command not in commands:
            problems.append(f"tmerge {command}: no such command")
            continue
        known = {o for p in commands[command].params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for arg in args:
            flag = arg.strip("[]").split("=", 1)[0]
            if re.fullmatch(r"--?[A-Za-z][\w-]*", flag) and flag not in known:
                problems.append(f"tmerge {command}: no option {flag}")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(sorted(set(problems)))
