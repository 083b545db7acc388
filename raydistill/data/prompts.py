"""Prompt/response data for decoders: loading, tokenisation, and training rows with response-only labels.

Layouts (decoders only):

* A *training row* is ``prompt tokens + response tokens (+ EOS)``, **right**-padded: real tokens sit at
  positions 0..len-1, so a causal model needs no position ids. ``labels`` follow the project convention
  (aligned with the logits: ``labels[t]`` is the token at ``t+1``) and are -100 wherever ``t+1`` is a prompt
  or padding position, i.e. only response tokens (and the EOS closing a response) are predicted.
* Prompts fed to ``generate`` are **left**-padded (see :mod:`raydistill.generation`): new tokens are
  appended after the last real prompt token of every row.

Prompts longer than ``max_prompt_tokens`` keep their *last* tokens (the part next to the response);
responses are cut at ``max_response_tokens`` (EOS included). The built-in set completes fact sentences
about the world of :mod:`raydistill.data.synthetic` (offline tests and the debug job).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from raydistill.config import PromptDataSpec, template_fields
from raydistill.data.blocks import BatchSampler, TokenInfo
from raydistill.data.corpus import hold_out, read_jsonl, read_text
from raydistill.data.masking import IGNORE
from raydistill.errors import ConfigError


# ----------------------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class PromptExample:
    prompt: str
    response: str


def builtin_prompt_rows(num_examples: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows ``{"prompt", "response"}`` about the built-in world of ``seed``, in the corpus's own phrasing so
    that a teacher trained on the built-in corpus (which has no question/answer format) can answer them: the
    prompt opens a fact sentence ("Alice Smith works as"), the response completes it with the world's fact
    (" a doctor for Northwind Labs."). Deterministic; each distinct prompt once (at most ~400 for the
    default world), shuffled."""
    from raydistill.data.synthetic import build_world

    world = build_world(seed)
    rows = []
    for p in world.persons:
        rows += [
            (f"{p.name} lives", f" in {p.city}."),
            (f"{p.name} works as", f" {_article(p.profession)} {p.profession} for {p.employer}."),
            (f"{p.name} owns", f" {_article(p.item_size)} {p.item_size} {p.item_colour} {p.item}."),
        ]
    for o in world.organisations:
        rows.append((f"{o.name} is", f" {_article(o.field)} {o.field} company based in {o.city}."))
    random.Random(f"raydistill-prompts/{seed}").shuffle(rows)
    return [{"prompt": prompt, "response": response} for prompt, response in rows[:num_examples]]


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def read_prompt_rows(path: str, where: str = "prompts.path") -> list[dict]:
    """Objects from a ``.jsonl`` file (one per line) or a ``.json`` file holding a list of objects."""
    p = Path(path)
    text = read_text(p, where)
    if p.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ConfigError(f"{where}: {path}: a .json prompt file must hold a list of objects")
        return rows
    return [row for _, row in read_jsonl(p, where)]


def to_examples(rows: list[dict], spec: PromptDataSpec, where: str, origin: str) -> list[PromptExample]:
    """Apply the template; a missing field is a ConfigError naming the setting, the file and the row."""
    fields = template_fields(spec.template)
    out = []
    for n, row in enumerate(rows, 1):
        for name in fields:
            if name not in row:
                raise ConfigError(f"{where}.template: field {name!r} missing in {origin} example {n} "
                                  f"(found {sorted(row)})")
        if spec.response_field not in row:
            raise ConfigError(f"{where}.response_field: field {spec.response_field!r} missing in {origin} "
                              f"example {n} (found {sorted(row)})")
        prompt = spec.template.format(**{k: "" if row[k] is None else str(row[k]) for k in fields})
        out.append(PromptExample(prompt, str(row[spec.response_field] or "")))
    return out


def load_prompt_examples(spec: PromptDataSpec, where: str = "prompts") -> tuple[list[PromptExample],
                                                                                  list[PromptExample]]:
    """(train, validation) examples; without a validation file a seeded ``validation_fraction`` is held out."""
    if spec.source == "builtin":
        rows = builtin_prompt_rows(spec.builtin.num_examples, spec.builtin.seed)
        examples = to_examples(rows, spec, where, "the built-in set")
        val = None
    else:
        examples = [e for path in spec.path for e in to_examples(read_prompt_rows(path, f"{where}.path"), spec,
                                                                 where, path)]
        val = ([e for path in spec.validation_path
                for e in to_examples(read_prompt_rows(path, f"{where}.validation_path"), spec, where, path)]
               if spec.validation_path else None)
    if val is None:
        examples, val = hold_out(examples, spec.validation_fraction, spec.seed)
    if spec.max_examples:
        examples = examples[:spec.max_examples]
    if not examples or not val:
        raise ConfigError(f"{where}: no training or no validation examples "
                          f"({len(examples)} / {len(val)}); add examples or a validation_path")
    return examples, val


# ----------------------------------------------------------------------------------------------- tokens
@dataclass
class PromptSet:
    """Tokenised prompts and their reference responses (ragged, as int32 arrays; picklable)."""

    prompts: list[np.ndarray]
    responses: list[np.ndarray]  # reference response ids, EOS appended, cut at max_response_tokens
    references: list[str]  # reference response texts (ROUGE)

    def __len__(self) -> int:
        return len(self.prompts)

    def digest(self) -> str:
        """Content hash of the prompt token ids (part of the generation cache key)."""
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(len(p).to_bytes(4, "little"))
            h.update(np.ascontiguousarray(p, dtype=np.int32).tobytes())
        return h.hexdigest()[:16]

    def subset(self, n: int) -> "PromptSet":
        return PromptSet(self.prompts[:n], self.responses[:n], self.references[:n])


def tokenize_prompts(examples: list[PromptExample], tok: PreTrainedTokenizerBase, max_prompt_tokens: int,
                     max_response_tokens: int) -> PromptSet:
    """Prompt and response are tokenised separately (as MiniLLM does), so the response's tokens do not
    depend on the prompt's last word. A BOS is prepended when the tokenizer has one distinct from EOS."""
    prompt_ids = tok([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    response_ids = tok([e.response for e in examples], add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id else None
    prompts, responses = [], []
    for p, r in zip(prompt_ids, response_ids):
        p = ([bos] if bos is not None else []) + list(p)
        if len(p) > max_prompt_tokens:  # keep the end of the prompt, next to the response
            p = ([bos] if bos is not None else []) + p[len(p) - max_prompt_tokens + (bos is not None):]
        if not p:
            p = [tok.eos_token_id]  # an empty prompt still needs a first state
        r = (list(r) + [tok.eos_token_id])[:max_response_tokens]
        prompts.append(np.asarray(p, dtype=np.int32))
        responses.append(np.asarray(r, dtype=np.int32))
    return PromptSet(prompts, responses, [e.response for e in examples])


@dataclass
class Sequences:
    """Right-padded prompt + response rows ``[N, L]``: real lengths and prompt lengths per row. Duck-types
    :class:`raydistill.data.blocks.Blocks` for :class:`BatchSampler`."""

    ids: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def build_sequences(prompts: list[np.ndarray], responses: list[np.ndarray], pad_id: int,
                    length: int | None = None) -> Sequences:
    """Rows ``prompt + response``; ``length`` (default: the longest row) fixes the padded width."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    longest = max((len(p) + len(r) for p, r in zip(prompts, responses)), default=1)
    width = length or longest
    if longest > width:
        raise ValueError(f"a prompt + response of {longest} tokens does not fit rows of {width}")
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    lengths = np.zeros(len(prompts), dtype=np.int32)
    prompt_lengths = np.zeros(len(prompts), dtype=np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p)] = p
        ids[i, len(p):len(p) + len(r)] = r
        lengths[i], prompt_lengths[i] = len(p) + len(r), len(p)
    return Sequences(ids, lengths, prompt_lengths)


def response_labels(input_ids: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """``labels[t] = input_ids[t+1]`` where ``prompt_length <= t+1 < length`` (a response token), else -100."""
    target = torch.arange(input_ids.size(1), device=input_ids.device)[None, :] + 1
    keep = (target >= prompt_lengths[:, None]) & (target < lengths[:, None])
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:]
    return labels.masked_fill(~keep, IGNORE)


def rows_to_batch(ids: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor,
                  special_ids: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """A batch of prompt + response rows; ``special_tokens_mask`` marks padding and the ``special_ids``
    (BOS, EOS: what IIT spans skip unless ``include_special_tokens``)."""
    attention = (torch.arange(ids.size(1), device=ids.device)[None, :] < lengths[:, None]).long()
    special = torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype, device=ids.device)) | ~attention.bool()
    return {"input_ids": ids, "attention_mask": attention, "labels": response_labels(ids, lengths, prompt_lengths),
            "prompt_lengths": prompt_lengths, "special_tokens_mask": special.long()}


class ResponseSampler(BatchSampler):
    """:class:`BatchSampler` over prompt + response rows: same deterministic (seed, step, micro, rank)
    indexing, labels only on responses, and each row's ``prompt_lengths`` in the batch (for on-policy
    sampling, which regenerates responses from the same prompts)."""

    def __init__(self, rows: Sequences, info: TokenInfo, **kwargs):
        if info.is_encoder:
            raise ValueError("prompt/response rows are for decoders")
        super().__init__(rows, info, **kwargs)

    def make_batch(self, idx: np.ndarray, row_seeds: list[list[int]], sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.blocks
        width = int(rows.lengths[idx].max())  # trim the padding every row of this batch shares
        batch = rows_to_batch(torch.from_numpy(rows.ids[idx, :width].astype(np.int64)),
                              torch.from_numpy(rows.lengths[idx].astype(np.int64)),
                              torch.from_numpy(rows.prompt_lengths[idx].astype(np.int64)), self.info.special_ids)
        return {**batch, "sample_ids": torch.from_numpy(np.asarray(sample_ids, dtype=np.int64))}


def batch_prompts(batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The prompt tokens of every row of a prompt/response batch."""
    ids, plen = batch["input_ids"].cpu().numpy(), batch["prompt_lengths"].cpu().numpy()
    return [ids[i, :plen[i]].astype(np.int32) for i in range(len(ids))]
