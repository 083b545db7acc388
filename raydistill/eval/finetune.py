"""Fine-tune a task head on a task's training examples and score it on its evaluation examples:
sequence classification/regression (GLUE), token classification (NER) and span extraction (SQuAD)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)

from raydistill.eval import features as feats
from raydistill.eval import loop, metrics, qa
from raydistill.eval.model_source import ModelSource, build_model, load_tokenizer
from raydistill.eval.settings import EvalSettings
from raydistill.eval.taskdata import TaskData
from raydistill.eval.tasks import TaskSpec


@dataclass
class TaskOutcome:
    metrics: dict[str, float]
    n_train: int  # examples fine-tuned on (0 for perplexity)
    n_eval: int  # examples scored (perplexity: predicted tokens)
    note: str = ""
    train_loss: float | None = None
    method: str = ""  # how the metric was computed where a setting changes it (perplexity's windows)


_CLASSIFICATION_METRICS = {
    "accuracy": metrics.accuracy, "f1": metrics.f1_binary, "matthews_corr": metrics.matthews_corrcoef,
    "pearson": metrics.pearson, "spearman": metrics.spearman,
}


def learning_rate(source: ModelSource, settings: EvalSettings) -> float:
    if settings.learning_rate is not None:
        return settings.learning_rate
    # A random-init preset learns from scratch and needs a far larger step than pretrained weights.
    return 1e-3 if source.from_scratch else 5e-5


def _train(model, features, label_keys, source, settings, seed, device, pad_id) -> float:
    result = loop.train(model, features, label_keys=label_keys, lr=learning_rate(source, settings),
                        epochs=settings.epochs, batch_size=settings.batch_size, warmup_ratio=settings.warmup_ratio,
                        weight_decay=settings.weight_decay, seed=seed, device=device, pad_id=pad_id)
    return result["train_loss"]


def run_classification(spec: TaskSpec, source: ModelSource, data: TaskData, settings: EvalSettings, seed: int,
                       device: torch.device) -> TaskOutcome:
    texts = [t for e in data.train for t in (e["text_a"], e["text_b"]) if t]
    tokenizer = load_tokenizer(source, texts, settings.vocab_size)
    regression = spec.kind == "regression"
    torch.manual_seed(seed)
    model = build_model(source, AutoModelForSequenceClassification, tokenizer, num_labels=spec.num_labels,
                        problem_type="regression" if regression else "single_label_classification")
    train_features = feats.encode_classification(tokenizer, data.train, settings.max_length, regression)
    eval_features = feats.encode_classification(tokenizer, data.eval, settings.max_length, regression)
    loss = _train(model, train_features, ("labels",), source, settings, seed, device, tokenizer.pad_token_id)
    outputs = loop.predict(model, eval_features, outputs=("logits",), per_token=False,
                           batch_size=settings.eval_batch_size, device=device, pad_id=tokenizer.pad_token_id)
    gold = [e["label"] for e in data.eval]
    if regression:
        preds = [o["logits"][0].item() for o in outputs]
    else:
        preds = [int(o["logits"].argmax()) for o in outputs]
    scores = {name: _CLASSIFICATION_METRICS[name](preds, gold) for name in spec.metrics}
    return TaskOutcome(scores, len(data.train), len(data.eval), data.note, loss)


def _tag_set(data: TaskData) -> list[str]:
    kinds = sorted({t[2:] for e in data.train + data.eval for t in e["tags"] if t != "O"})
    return ["O"] + [f"{p}-{k}" for k in kinds for p in "BI"]


def run_ner(spec: TaskSpec, source: ModelSource, data: TaskData, settings: EvalSettings, seed: int,
            device: torch.device) -> TaskOutcome:
    tokenizer = load_tokenizer(source, [" ".join(e["tokens"]) for e in data.train], settings.vocab_size)
    tags = _tag_set(data)
    label_ids = {t: i for i, t in enumerate(tags)}
    torch.manual_seed(seed)
    model = build_model(source, AutoModelForTokenClassification, tokenizer, num_labels=len(tags),
                        id2label=dict(enumerate(tags)), label2id=label_ids)
    train_features = feats.encode_tagging(tokenizer, data.train, label_ids, settings.max_length)
    eval_features = feats.encode_tagging(tokenizer, data.eval, label_ids, settings.max_length)
    loss = _train(model, train_features, ("labels",), source, settings, seed, device, tokenizer.pad_token_id)
    outputs = loop.predict(model, eval_features, outputs=("logits",), per_token=True,
                           batch_size=settings.eval_batch_size, device=device, pad_id=tokenizer.pad_token_id)
    predicted = []
    for example, feature, out in zip(data.eval, eval_features, outputs):
        words = ["O"] * len(example["tokens"])
        best = out["logits"].argmax(-1).tolist()
        for position, w in enumerate(feature["word_index"]):
            if w >= 0:
                words[w] = tags[best[position]]
        predicted.append(words)
    scores = metrics.entity_scores(predicted, [e["tags"] for e in data.eval])
    truncated = sum(sum(w >= 0 for w in f["word_index"]) < len(e["tokens"]) for e, f in zip(data.eval, eval_features))
    note = "; ".join(x for x in (data.note, f"{truncated} sentences cut at max_length" if truncated else "") if x)
    return TaskOutcome({m: scores[m] for m in spec.metrics}, len(data.train), len(data.eval), note, loss)


def run_qa(spec: TaskSpec, source: ModelSource, data: TaskData, settings: EvalSettings, seed: int,
           device: torch.device) -> TaskOutcome:
    texts = list(dict.fromkeys(e["context"] for e in data.train)) + [e["question"] for e in data.train]
    tokenizer = load_tokenizer(source, texts, settings.vocab_size)
    torch.manual_seed(seed)
    model = build_model(source, AutoModelForQuestionAnswering, tokenizer)
    train_features = qa.train_features(tokenizer, data.train, settings.max_length, settings.doc_stride)
    eval_features = qa.eval_features(tokenizer, data.eval, settings.max_length, settings.doc_stride)
    loss = _train(model, train_features, ("start_positions", "end_positions"), source, settings, seed, device,
                  tokenizer.pad_token_id)
    inputs = [{k: v for k, v in f.items() if k not in ("example", "context_offsets")} for f in eval_features]
    outputs = loop.predict(model, inputs, outputs=("start_logits", "end_logits"), per_token=True,
                           batch_size=settings.eval_batch_size, device=device, pad_id=tokenizer.pad_token_id)
    answers = qa.best_answers(data.eval, eval_features, outputs, settings.max_answer_tokens)
    scores = metrics.squad_scores(answers, {e["id"]: e["answers"]["text"] for e in data.eval})
    note = "; ".join(x for x in (data.note, f"{len(train_features)} train / {len(eval_features)} eval windows of "
                                 f"{settings.max_length} tokens, stride {settings.doc_stride}") if x)
    return TaskOutcome({m: scores[m] for m in spec.metrics}, len(data.train), len(data.eval), note, loss)
