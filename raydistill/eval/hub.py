"""The same tasks from the Hugging Face hub (online users), converted to the local loaders' schemas."""

from __future__ import annotations

from raydistill.eval.errors import EvalDataError

# task -> (text_a column, text_b column) in nyu-mll/glue
_GLUE_HUB = {
    "sst2": ("sentence", None), "cola": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"), "qnli": ("question", "sentence"),
    "mnli": ("premise", "hypothesis"), "qqp": ("question1", "question2"),
}
GLUE_DATASET = "nyu-mll/glue"
SQUAD_DATASET = "rajpurkar/squad"
CONLL_DATASET = "eriktks/conll2003"
WIKITEXT_DATASET = ("Salesforce/wikitext", "wikitext-2-v1")  # the tokenized release, as the local files


def _load(name: str, config: str | None, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, missing dataset or split: the user's to fix
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvalDataError(f"cannot load {name}{'/' + config if config else ''} split {split!r} from the "
                            f"Hugging Face hub ({first}); offline, pass --data-dir with the local files") from None


def glue(task: str, split: str) -> list[dict]:
    """``split``: 'train' or 'dev' (MNLI: the matched dev set)."""
    a, b = _GLUE_HUB[task]
    hub_split = "train" if split == "train" else ("validation_matched" if task == "mnli" else "validation")
    ds = _load(GLUE_DATASET, task, hub_split)
    return [{"text_a": row[a], "text_b": row[b] if b else None,
             "label": float(row["label"]) if task == "stsb" else int(row["label"])} for row in ds]


def squad(split: str) -> list[dict]:
    ds = _load(SQUAD_DATASET, None, "train" if split == "train" else "validation")
    return [{"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
             "answers": {"text": list(r["answers"]["text"]),
                         "answer_start": [int(s) for s in r["answers"]["answer_start"]]}} for r in ds]


def conll(split: str) -> list[dict]:
    ds = _load(CONLL_DATASET, None, "train" if split == "train" else "validation")
    names = ds.features["ner_tags"].feature.names
    return [{"tokens": list(r["tokens"]), "tags": [names[t] for t in r["ner_tags"]]} for r in ds]


def wikitext(split: str) -> list[str]:
    ds = _load(*WIKITEXT_DATASET, split)
    return [t.strip() for t in ds["text"] if t.strip()]
