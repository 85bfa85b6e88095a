"""Every relative link and every repository path that README.md, docs/*.md and results/README.md cite exists in the repository."""
from __future__ import annotations

import glob
import itertools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "results" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# A cited path starts with one of these; `dgpo/...` is the package, src/dgpo/...
PATH_ROOTS = {"src/": "src/", "dgpo/": "src/dgpo/", "configs/": "configs/", "results/": "results/", "benchmarks/": "benchmarks/",
              "tests/": "tests/"}
# Paths a page may cite before they exist (a protocol naming where its runs will write, written before the runs).
NOT_YET_WRITTEN: set[str] = set()


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (hyphens kept), spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a markdown page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M):
        anchor = github_anchor(heading)
        out.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
        seen[anchor] = seen.get(anchor, 0) + 1
    return out


def expand_braces(path: str) -> list[str]:
    """`a{0,1}b` -> [a0b, a1b], as the shell does."""
    parts = re.split(r"\{([^{}]*,[^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def cited_paths(text: str) -> list[str]:
    """Repository paths in code spans and fenced blocks: words starting with one of PATH_ROOTS (dgpo/ read as src/dgpo/)."""
    spans = CODE_SPAN.findall(FENCE.sub("", text)) + FENCE.findall(text)
    paths = []
    for word in itertools.chain.from_iterable(span.split() for span in spans):
        word = word.strip("'\"(),;:.")
        for root, target in PATH_ROOTS.items():
            if word.startswith(root) and "/" in word[len(root):] + "/" and not word.startswith("dgpo/dgpo"):
                paths.append(target + word[len(root):])
                break
    return paths


def problems(page: Path, text: str) -> list[str]:
    """What the page cites that does not exist: relative links (and their anchors) and repository paths."""
    found = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s):, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            found.append(f"link {target}: no {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            found.append(f"link {target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    for cited in cited_paths(text):
        if cited in NOT_YET_WRITTEN:
            continue
        if not any(glob.glob(str(REPO / p)) for p in expand_braces(cited.rstrip("/"))):
            found.append(f"path {cited}: not in the repository")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_and_cited_path_of_the_page_exists(page):
    assert problems(page, page.read_text()) == []


def test_the_check_finds_a_missing_file_path_anchor_and_a_page_outside_the_docs():
    bad = ("See [the log](docs/no-such-page.md), [a heading](docs/experiment-log.md#no-such-heading), "
           "`results/no_such_result.json`, `python benchmarks/no_such_script.py --x 1` and `dgpo/no_such_module.py`; "
           "fine: [the log](docs/experiment-log.md), `results/dgpo_hour_2026-11-30/dgpo_shapes_cpu_seed{0,1}_metrics.jsonl`, `dgpo/losses.py`, "
           "`results/rollout_steps/bench_6step_seed1*`, [web](https://example.org/x.md), `dgpo.losses.dgpo_loss`.\n"
           "```bash\npython benchmarks/missing_in_a_block.py\n```\n")
    assert problems(REPO / "README.md", bad) == [
        "link docs/no-such-page.md: no docs/no-such-page.md",
        "link docs/experiment-log.md#no-such-heading: no heading #no-such-heading in docs/experiment-log.md",
        "path results/no_such_result.json: not in the repository",
        "path benchmarks/no_such_script.py: not in the repository",
        "path src/dgpo/no_such_module.py: not in the repository",
        "path benchmarks/missing_in_a_block.py: not in the repository",
    ]


def test_github_anchors_drop_punctuation_and_number_repeated_headings(tmp_path):
    assert github_anchor("2026-11-30 · The quick start: 0.695 -> 0.750") == "2026-11-30--the-quick-start-0695---0750"
    assert github_anchor("GenEval reward (`geneval`)") == "geneval-reward-geneval"
    page = tmp_path / "page.md"
    page.write_text("# Title\n## Notes\n```bash\n# not a heading\n```\n## Notes\n")
    assert anchors(page) == {"title", "notes", "notes-1"}
