"""The fine-tune and evaluation examples of a task: from a local data dir, the hub or the built-in corpus,
capped to the settings' sizes by a fixed shuffle (the same subset for every fine-tuning seed)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from raydistill.eval import hub, loaders
from raydistill.eval.errors import EvalDataError
from raydistill.eval.settings import EvalSettings
from raydistill.eval.tasks import TaskSpec

_SUBSET_SEED = 1234  # fixed, so that seeds vary the fine-tuning only, never the data


@dataclass
class TaskData:
    train: list  # examples to fine-tune on (perplexity: text to train a preset's tokenizer on)
    eval: list
    note: str = ""  # how the data was obtained when it departs from the standard splits


def _cap(items: list, limit: int | None) -> list:
    if limit is None or len(items) <= limit:
        return items
    order = list(range(len(items)))
    random.Random(_SUBSET_SEED).shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


def check_data(spec: TaskSpec, data_dir: str | Path | None) -> None:
    """Fail fast on the driver (before any Ray task) when a local file a task needs is missing."""
    if data_dir is None or spec.name.startswith("builtin-"):
        return
    root = Path(data_dir)
    if not root.is_dir():
        raise EvalDataError(f"data dir {root} does not exist or is not a directory")
    if spec.name in loaders.GLUE_FORMATS:
        needed = [loaders.glue_path(root, spec.name, "dev")]
    elif spec.name == "conll2003":
        needed = [root / "conll2003" / "train.txt", root / "conll2003" / "valid.txt"]
    elif spec.name == "squad":
        needed = [root / "squad-v1.1" / "dev-v1.1.json"]
    else:
        needed = [root / "wikitext-2" / "wiki.test.tokens"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise EvalDataError(f"task {spec.name}: missing {', '.join(missing)} (expected the layout of "
                            "../shared/data: glue/<TASK>/{train,dev}.tsv, conll2003/{train,valid}.txt, "
                            "squad-v1.1/dev-v1.1.json, wikitext-2/wiki.*.tokens)")


def load_task_data(spec: TaskSpec, settings: EvalSettings, data_dir: str | Path | None = None) -> TaskData:
    if spec.name.startswith("builtin-"):
        data = _builtin(spec, settings)
    elif data_dir is not None:
        check_data(spec, data_dir)
        data = _local(spec, Path(data_dir), settings)
    else:
        data = _from_hub(spec)
    sizes = len(data.train), len(data.eval)
    data.train = _cap(data.train, settings.max_train_examples)
    data.eval = _cap(data.eval, settings.max_eval_examples)
    if not spec.name.startswith("builtin-") and (len(data.train), len(data.eval)) != sizes:
        capped = f"capped to {len(data.train)} of {sizes[0]} train and {len(data.eval)} of {sizes[1]} eval examples"
        data.note = f"{data.note}; {capped}" if data.note else capped
    if spec.kind != "perplexity" and not data.train:
        raise EvalDataError(f"task {spec.name}: no fine-tuning examples")
    if not data.eval:
        raise EvalDataError(f"task {spec.name}: no evaluation examples")
    return data


def _builtin(spec: TaskSpec, settings: EvalSettings) -> TaskData:
    from raydistill.data import synthetic as syn

    seed = settings.builtin_seed
    n_train = settings.max_train_examples or settings.builtin_train_examples
    n_eval = settings.max_eval_examples or settings.builtin_eval_examples
    note = f"built-in corpus, world seed {seed}"
    if spec.name == "builtin-cola":
        convert = lambda rows: [{"text_a": r["sentence"], "text_b": None, "label": r["label"]} for r in rows]
        return TaskData(convert(syn.sentence_classification_examples(n_train, seed, "train")),
                        convert(syn.sentence_classification_examples(n_eval, seed, "dev")), note)
    if spec.name == "builtin-ner":
        convert = lambda rows: [{"tokens": r["tokens"], "tags": r["ner_tags"]} for r in rows]
        return TaskData(convert(syn.ner_examples(n_train, seed, "train")),
                        convert(syn.ner_examples(n_eval, seed, "dev")), note)
    if spec.name == "builtin-qa":
        return TaskData(syn.qa_examples(n_train, seed, "train"), syn.qa_examples(n_eval, seed, "dev"), note)
    # Perplexity: held-out documents of the world the student was distilled on.
    return TaskData(syn.generate_documents(n_train, seed), syn.heldout_documents(n_eval, seed), note)


def _split_in_two(items: list, fraction: float) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(_SUBSET_SEED).shuffle(order)
    cut = max(1, min(len(items) - 1, round(len(items) * fraction)))
    return [items[i] for i in sorted(order[:cut])], [items[i] for i in sorted(order[cut:])]


def _local(spec: TaskSpec, root: Path, settings: EvalSettings) -> TaskData:
    if spec.name in loaders.GLUE_FORMATS:
        dev, _ = loaders.read_glue(loaders.glue_path(root, spec.name, "dev"), spec.name)
        train_path = loaders.glue_path(root, spec.name, "train")
        if train_path.is_file():
            train, skipped = loaders.read_glue(train_path, spec.name)
            return TaskData(train, dev, f"skipped {skipped} malformed train rows" if skipped else "")
        # QNLI's train file is not in ../shared/data: fine-tune on half of dev, score the other half.
        train, dev_rest = _split_in_two(dev, 0.5)
        return TaskData(train, dev_rest, f"{train_path.name} absent: dev split in two, fine-tuned on "
                                         f"{len(train)} rows, evaluated on the other {len(dev_rest)}")
    if spec.name == "conll2003":
        return TaskData(loaders.read_conll(root / "conll2003" / "train.txt"),
                        loaders.read_conll(root / "conll2003" / "valid.txt"))
    if spec.name == "squad":
        dev_articles = loaders.read_squad(root / "squad-v1.1" / "dev-v1.1.json")
        dev = [q for a in dev_articles for q in a["questions"]]
        train_path = root / "squad-v1.1" / "train-v1.1.json"
        if train_path.is_file():
            return TaskData([q for a in loaders.read_squad(train_path) for q in a["questions"]], dev)
        # Split by article, so no context is both fine-tuned on and evaluated.
        tune, held = _split_in_two(dev_articles, settings.squad_finetune_fraction)
        train = [q for a in tune for q in a["questions"]]
        evaluation = [q for a in held for q in a["questions"]]
        return TaskData(train, evaluation,
                        f"train-v1.1.json absent: dev split by article, fine-tuned on {len(tune)} articles "
                        f"({len(train)} questions), evaluated on the other {len(held)} ({len(evaluation)})")
    folder = root / "wikitext-2"
    train_path = folder / "wiki.train.tokens"
    return TaskData(loaders.read_wikitext(train_path) if train_path.is_file() else [],
                    loaders.read_wikitext(folder / "wiki.test.tokens"), "WikiText-2 test set")


def _from_hub(spec: TaskSpec) -> TaskData:
    if spec.name in loaders.GLUE_FORMATS:
        return TaskData(hub.glue(spec.name, "train"), hub.glue(spec.name, "dev"))
    if spec.name == "conll2003":
        return TaskData(hub.conll("train"), hub.conll("dev"))
    if spec.name == "squad":
        return TaskData(hub.squad("train"), hub.squad("dev"))
    return TaskData(hub.wikitext("train"), hub.wikitext("test"), "WikiText-2 test set")

