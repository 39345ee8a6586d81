"""The reference in docs/ builds: ``mkdocs build --strict`` (the `docs` extra) into a temporary
directory, so that a broken link or anchor, a page missing from mkdocs.yml's nav, or a nav entry
without its page fails the suite (mkdocs.yml turns those checks into warnings, --strict into
errors). And the README stays a newcomer's page: short, its links to docs/ resolving."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from _tasks import scaled

ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_build_with_warnings_as_errors(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--clean",
                          "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir",
                          str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         timeout=scaled(120), stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout}\n{out.stderr}"
    assert "WARNING" not in out.stderr, out.stderr
    for page in sorted((ROOT / "docs").glob("*.md")):
        built = tmp_path / "site" / (page.stem if page.stem != "index" else "") / "index.html"
        assert built.is_file(), f"{page.name} was not built"
    assert (tmp_path / "site" / "dashboard.png").is_file()


def test_no_escaped_pipe_in_the_pages() -> None:
    # GitHub reads `a \| b` in a table cell as a pipe; Python-Markdown (MkDocs) keeps the
    # backslash inside code. Say "or" instead.
    for page in sorted((ROOT / "docs").glob("*.md")):
        for number, line in enumerate(page.read_text().splitlines(), 1):
            assert "\\|" not in line, f"docs/{page.name}:{number}: an escaped pipe"


def test_the_readme_is_short_and_its_links_to_the_docs_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert text.count("\n") <= 250, "the README is a newcomer's page: move reference to docs/"
    assert text.index("./scripts/demo") < text.index("## Install")  # the two commands first
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 10, links
    for link in links:
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in text, f"the README's map leaves out docs/{page.name}"
        assert f" {page.name}\n" in mkdocs, f"mkdocs.yml's nav leaves out {page.name}"
