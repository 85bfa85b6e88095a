"""The paper recipes' prompt sets, and `dgpo prompts fetch`, which writes them where the recipes read them.

Each set is one file of a public repository at a fixed commit, identified by its git blob hash (so what is
downloaded is byte for byte the file described here), converted into a JSONL prompt file that
:class:`dgpo.train.data.PromptSource` reads: one ``{"prompt", "metadata"}`` object per line. JSONL, not one prompt
per line, because a user-written prompt may start with '{' or '[', which the loader would read as JSON. A training
set names the test set it is held out from, and fetching refuses a training set sharing a prompt with its test set.
The files are not committed with dgpo: their sources and licenses are in ``prompts/README.md``.
"""
from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .registry import Registry
from .rewards.geneval import geneval_prompt_rows

FLOW_GRPO = ("yifan123/flow_grpo", "ac4c86e8cae021841f1fde853d340e0db67690dd")
GENEVAL = ("djghosh13/geneval", "af4902f24d3ca90ebbb446dd9891a59e0f82725f")
DEFAULT_DIRECTORY = "prompts"


@dataclass(frozen=True)
class PromptSet:
    """One prompt file: where it comes from (``path`` in GitHub ``repository`` at ``commit``, whose content has the
    git blob hash ``blob``), how it is converted (a registered converter), its prompt count where known, and for a
    training set the test set it must share no prompt with."""

    file: str  # the converted file's name, under the prompts directory
    repository: str
    commit: str
    path: str
    blob: str
    converter: str
    license: str
    count: int | None = None
    held_out: str = ""  # the test set's file

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repository}/{self.commit}/{self.path}"


PROMPT_SETS: tuple[PromptSet, ...] = (
    PromptSet("geneval_test.jsonl", *GENEVAL, "prompts/evaluation_metadata.jsonl", "efc21c7e639cd45554a1e44fac87157211f16d51",
              "geneval", "MIT", 553),
    PromptSet("geneval_train.jsonl", *FLOW_GRPO, "dataset/geneval/train_metadata.jsonl", "0b97e8a6802c08fc7537cd00c76ae79c851bddcb",
              "geneval", "MIT", held_out="geneval_test.jsonl"),
    PromptSet("ocr_test.jsonl", *FLOW_GRPO, "dataset/ocr/test.txt", "8deb4f8d8f2e863f45353354243669b3c991a6a2", "lines", "MIT", 1018),
    PromptSet("ocr_train.jsonl", *FLOW_GRPO, "dataset/ocr/train.txt", "3ce0521b77b0a9031191d66ecc36ebaaf27a3922", "lines", "MIT",
              held_out="ocr_test.jsonl"),
    PromptSet("pickscore_test.jsonl", *FLOW_GRPO, "dataset/pickscore/test.txt", "45f05231b969fb5f74c8debd606b22cd3be27f8e", "lines",
              "MIT (Flow-GRPO); captions of Pick-a-Pic v1", 2048),
    PromptSet("pickscore_train.jsonl", *FLOW_GRPO, "dataset/pickscore/train.txt", "a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b", "lines",
              "MIT (Flow-GRPO); captions of Pick-a-Pic v1", 25432, held_out="pickscore_test.jsonl"),
)

CONVERTERS: Registry[Callable[[str, str], list[dict]]] = Registry("prompt converter")


def register_converter(name: str):
    """Register a converter: (source text, source name) -> prompt rows ``{"prompt", "metadata"}``."""
    return CONVERTERS.register(name)


@register_converter("lines")
def prompt_lines(text: str, source: str) -> list[dict]:
    """One prompt per non-empty line, stripped (as the text loader reads it), without metadata."""
    return [{"prompt": line.strip(), "metadata": {}} for line in text.splitlines() if line.strip()]


register_converter("geneval")(geneval_prompt_rows)


def git_blob_hash(data: bytes) -> str:
    """Git's object name of a file with content ``data``: SHA-1 of ``b"blob <size>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def shared_prompts(train: list[dict], test: list[dict]) -> list[str]:
    """The prompt texts of ``train`` that ``test`` also has, in ``train``'s order."""
    held_out = {row["prompt"] for row in test}
    return [row["prompt"] for row in train if row["prompt"] in held_out]


def convert(prompt_set: PromptSet, data: bytes) -> list[dict]:
    """The rows of a downloaded source file, checked against its blob hash and (where known) its prompt count."""
    name = f"{prompt_set.repository}@{prompt_set.commit[:7]}:{prompt_set.path}"
    if git_blob_hash(data) != prompt_set.blob:
        raise UserError(f"{name}: downloaded content has git blob {git_blob_hash(data)}, expected {prompt_set.blob}")
    rows = CONVERTERS.get(prompt_set.converter)(data.decode("utf-8"), name)
    if prompt_set.count is not None and len(rows) != prompt_set.count:
        raise UserError(f"{name}: {len(rows)} prompts, expected {prompt_set.count}")
    return rows


def download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError) as exc:
        raise UserError(f"could not download {url}: {getattr(exc, 'reason', exc)}") from None


def _matches(prompt_set: PromptSet, name: str) -> bool:
    return prompt_set.file.startswith(name.removesuffix(".jsonl"))


def select(names: list[str]) -> list[PromptSet]:
    """The sets named (file names, with or without extension, or a prefix such as ``geneval``), each training set's
    test set with it; all with no names."""
    unknown = [n for n in names if not any(_matches(s, n) for s in PROMPT_SETS)]
    if unknown:
        raise UserError(f"unknown prompt set {', '.join(unknown)}; available: {', '.join(s.file for s in PROMPT_SETS)}")
    chosen = {s.file for s in PROMPT_SETS if not names or any(_matches(s, n) for n in names)}
    chosen |= {s.held_out for s in PROMPT_SETS if s.file in chosen and s.held_out}
    return [s for s in PROMPT_SETS if s.file in chosen]


def fetch_hint(spec: str) -> str:
    """For a missing prompt file that is one of :data:`PROMPT_SETS`: the command that writes it; else empty."""
    prompt_set = next((s for s in PROMPT_SETS if Path(spec).name == s.file), None)
    if prompt_set is None:
        return ""
    benchmark = prompt_set.file.split("_")[0]
    return f"a paper prompt set, not shipped: `dgpo prompts fetch {benchmark}` from the repository root writes it, prompts/README.md"


def fetch_prompt_sets(sets: list[PromptSet], directory: str | Path, fetch: Callable[[str], bytes] = download,
                      log: Callable[[str], None] = print) -> dict[str, int]:
    """Download, check and convert ``sets`` into ``directory``; returns file -> prompt count. Nothing is written
    unless every set checks out (blob hash, count, no training prompt in its test set)."""
    converted = {s.file: convert(s, fetch(s.url)) for s in sets}
    for s in sets:
        if s.held_out:
            overlap = shared_prompts(converted[s.file], converted[s.held_out])
            if overlap:
                raise UserError(f"{s.file}: {len(overlap)} training prompts are in {s.held_out}, e.g. {overlap[0]!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for s in sets:
        (directory / s.file).write_text(jsonl(converted[s.file]), encoding="utf-8")
        log(f"wrote {directory / s.file}: {len(converted[s.file])} prompts from {s.repository}@{s.commit[:7]}:{s.path} ({s.license})")
    return {file: len(rows) for file, rows in converted.items()}
