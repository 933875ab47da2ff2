"""The README and docs/ stay true: the README's experiment file is the quickstart's, and every
relative link points at a file and heading that exist."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"(?m)^#{1,6} (.+?)\s*$", re.sub(r"(?ms)^```.*?^```", "", text))
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_experiment_file_is_the_quickstart():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "the README shows one experiment file"
    assert tomllib.loads(blocks[0]) == tomllib.loads((ROOT / "experiments/quickstart.toml").read_text())


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    cmds = [ln for ln in lines[:6] if ln.startswith(("pip ", "lth "))]
    assert len(cmds) == 2 and "lth sweep experiments/quickstart.toml" in cmds[0] and "pytest" in cmds[1]


def test_every_relative_link_resolves():
    bad = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                bad.append(f"{page.name}: {target} (no heading)")
    assert not bad, bad


def test_every_experiment_file_is_listed():
    listed = (ROOT / "docs/experiments.md").read_text()
    missing = [p.name for p in (ROOT / "experiments").glob("*.toml") if f"experiments/{p.name}" not in listed]
    assert not missing, missing
