"""Readers for benchmark files in their original formats (the layout of ../shared/data).

* GLUE: ``glue/<TASK>/{train,dev,test}.tsv`` as ``download_glue_data.py`` writes them, split on TAB with
  quoting disabled (STS-B and RTE contain unbalanced ``"``); MNLI's dev file is ``dev_matched.tsv``.
* CoNLL-2003: ``conll2003/{train,valid,test}.txt``, ``token POS chunk NER`` per line, IOB2 tags.
* SQuAD v1.1: ``squad-v1.1/{train,dev}-v1.1.json``, the official JSON.
* WikiText-2: ``wikitext-2/wiki.{train,valid,test}.tokens``.

Classification rows come out as ``{"text_a", "text_b", "label"}`` (label None for unlabeled test files),
NER sentences as ``{"tokens", "tags"}``, SQuAD questions as ``{"id", "title", "context", "question",
"answers": {"text", "answer_start"}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from raydistill.eval.errors import EvalDataError

NER_TYPES = ("PER", "ORG", "LOC", "MISC")


@dataclass(frozen=True)
class GlueFormat:
    folder: str
    text_a: str | int  # header name, or column index for files without a header
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # label strings in id order; None: the column holds the number
    header: bool = True
    dev_file: str = "dev.tsv"


GLUE_FORMATS = {
    "sst2": GlueFormat("SST-2", "sentence", None, "label", None),
    "cola": GlueFormat("CoLA", 3, None, 1, None, header=False),
    "mrpc": GlueFormat("MRPC", "#1 String", "#2 String", "Quality", None),
    "stsb": GlueFormat("STS-B", "sentence1", "sentence2", "score", None),
    "rte": GlueFormat("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "qnli": GlueFormat("QNLI", "question", "sentence", "label", ("entailment", "not_entailment")),
    "mnli": GlueFormat("MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
                       dev_file="dev_matched.tsv"),
    "qqp": GlueFormat("QQP", "question1", "question2", "is_duplicate", None),
}
# QQP's train file has a few rows with missing fields (as GLUE's own processor notes); they are skipped.
_SKIP_SHORT_ROWS = {"qqp"}


def glue_path(data_dir: str | Path, task: str, split: str) -> Path:
    fmt = GLUE_FORMATS[task]
    name = fmt.dev_file if split == "dev" else f"{split}.tsv"
    return Path(data_dir) / "glue" / fmt.folder / name


def read_glue(path: str | Path, task: str) -> tuple[list[dict], int]:
    """Rows of a GLUE TSV file and the number of malformed rows skipped (QQP only; elsewhere an error).
    A file without a label column (the test files) gives label None."""
    fmt = GLUE_FORMATS[task]
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file (expected the GLUE layout <data-dir>/glue/{fmt.folder}/"
                            f"{{train,{fmt.dev_file.removesuffix('.tsv')}}}.tsv)")
    # utf-8-sig: MRPC's header starts with a byte-order mark.
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise EvalDataError(f"{path}: empty file")
    first = lines[0].split("\t")
    # CoLA train/dev have no header but CoLA test does ("index<TAB>sentence"); tell them apart by content.
    has_header = fmt.header or first[0] == "index"
    if has_header:
        columns = {name: i for i, name in enumerate(first)}
        body, width, start = lines[1:], len(first), 2
    else:
        columns, body, width, start = {}, lines, len(first), 1

    def col(key):
        if isinstance(key, int):
            return key if not has_header else None
        return columns.get(key)

    # Test files carry an "index" column and the text columns but no label.
    ia, ib, il = col(fmt.text_a), col(fmt.text_b) if fmt.text_b is not None else None, col(fmt.label)
    if has_header and not fmt.header:  # CoLA test
        ia, ib, il = columns.get("sentence"), None, None
    if ia is None or (fmt.text_b is not None and ib is None):
        raise EvalDataError(f"{path}: not a GLUE {task} file: header {first} lacks the text column(s) "
                            f"{[c for c in (fmt.text_a, fmt.text_b) if c is not None]}")
    rows, skipped = [], 0
    for n, line in enumerate(body, start):
        cells = line.split("\t")
        if len(cells) != width:
            if task in _SKIP_SHORT_ROWS:
                skipped += 1
                continue
            raise EvalDataError(f"{path}:{n}: {len(cells)} tab-separated fields, expected {width} "
                                "(GLUE files are read with quoting disabled)")
        rows.append({"text_a": cells[ia], "text_b": None if ib is None else cells[ib],
                     "label": None if il is None else _label(cells[il], fmt, path, n)})
    return rows, skipped


def _label(raw: str, fmt: GlueFormat, path: Path, line: int) -> int | float:
    try:
        if fmt.labels is not None:
            return fmt.labels.index(raw)
        return float(raw) if fmt.folder == "STS-B" else int(raw)
    except ValueError:
        allowed = fmt.labels if fmt.labels is not None else "a number"
        raise EvalDataError(f"{path}:{line}: label {raw!r} is not {allowed}") from None


def read_conll(path: str | Path) -> list[dict]:
    """Sentences of a CoNLL-2003 file; ``-DOCSTART-`` lines are document breaks, not sentences."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file (expected <data-dir>/conll2003/{{train,valid,test}}.txt)")
    sentences: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cells = line.split()
            if not cells:
                if tokens:
                    sentences.append({"tokens": tokens, "tags": tags})
                    tokens, tags = [], []
                continue
            if len(cells) != 4:
                raise EvalDataError(f"{path}:{n}: {len(cells)} columns, expected 4 (token POS chunk NER)")
            if cells[0] == "-DOCSTART-":
                continue
            tag = cells[3]
            if tag != "O" and (tag[:2] not in ("B-", "I-") or tag[2:] not in NER_TYPES):
                raise EvalDataError(f"{path}:{n}: NER tag {tag!r} is not O or B-/I- of {'/'.join(NER_TYPES)}")
            tokens.append(cells[0])
            tags.append(tag)
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    if not sentences:
        raise EvalDataError(f"{path}: no sentences found")
    return sentences


def read_squad(path: str | Path) -> list[dict]:
    """Articles of a SQuAD v1.1 JSON file, each ``{"title", "questions": [question dicts]}``."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file (expected <data-dir>/squad-v1.1/dev-v1.1.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        articles = []
        for article in data["data"]:
            questions = []
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    answers = qa["answers"]
                    questions.append({
                        "id": qa["id"], "title": article["title"], "context": context, "question": qa["question"],
                        "answers": {"text": [a["text"] for a in answers],
                                    "answer_start": [int(a["answer_start"]) for a in answers]}})
            articles.append({"title": article["title"], "questions": questions})
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise EvalDataError(f"{path}: not in the SQuAD v1.1 format (data/paragraphs/qas/answers): "
                            f"missing or bad field {e}") from None
    return articles


def read_wikitext(path: str | Path) -> list[str]:
    """Non-empty lines (paragraphs and ``= Heading =`` lines) of a WikiText file."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file (expected <data-dir>/wikitext-2/wiki.{{train,valid,test}}.tokens)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
