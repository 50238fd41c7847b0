"""The README and docs/ stay true: every relative link resolves, and every figure exists and is no
older than the JSON its benchmark script drew it from (same path, .json), so a rerun that
changed the numbers without redrawing the picture fails here.

"Older" is by last change: the last commit that touched the file, or its modification time when
it has uncommitted changes (or git is not there).
"""
from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)\)")


def _links(page: pathlib.Path) -> list[tuple[bool, str]]:
  """(is an image, target) of every relative link of a markdown page."""
  return [(bang == "!", target) for bang, target in LINK.findall(page.read_text())
          if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def _last_change(path: pathlib.Path) -> float:
  """Seconds since the epoch of the file's last change (see the module docstring)."""
  try:
    dirty = subprocess.run(["git", "status", "--porcelain", "--", str(path)], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.strip()
    committed = subprocess.run(["git", "log", "-1", "--format=%ct", "--", str(path)], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return path.stat().st_mtime
  return path.stat().st_mtime if dirty or not committed else float(committed)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: pathlib.Path) -> None:
  missing = [target for _, target in _links(page)
             if not (page.parent / target.split("#")[0]).exists()]
  assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"


def test_readme_shows_figures_no_older_than_their_json() -> None:
  figures = {(page.parent / target).resolve() for page in PAGES
             for image, target in _links(page) if image}
  readme_figures = [t for image, t in _links(REPO / "README.md") if image]
  assert len(readme_figures) >= 3, readme_figures
  for figure in sorted(figures):
    source = figure.with_suffix(".json")
    assert figure.is_file() and source.is_file(), (figure, source)
    assert _last_change(figure) >= _last_change(source), (
        f"{figure.relative_to(REPO)} is older than {source.relative_to(REPO)}: rerun the "
        "benchmark script that writes both (its command is under the figure)")
