"""Sampling responses from a decoder, and the on-disk cache of the teacher's responses (regime b).

``generate_responses`` runs Hugging Face ``generate`` on left-padded prompt batches and returns each
response cut after its first EOS. Under ZeRO-3 (parameters partitioned, ``ds_id`` on them) every rank must
run the same number of forward passes: callers give every rank the same number of prompts and
``generate_responses`` passes ``synced_gpus=True`` so ranks that finish early keep stepping.

The teacher's samples are generated once, on the Ray workers (each rank its shard of the prompts), gathered
to every rank and written by rank 0 to ``cache_dir/generations/<key>.npz`` (atomically, with a
``<key>.json`` description). The key hashes what determines the samples: the teacher's identity (hub id and
revision, or a local directory's weight files' sizes and mtimes, or a random preset's config and seed, plus
the precision), the prompt token ids, the tokenizer and the generation settings. Later runs and restarts
(Ray Train failure restarts included) find the file and skip generation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raydistill.models.adapters import eval_mode

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def is_zero3(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 partitions ``model``'s parameters."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def left_pad(prompts: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, max_len]`` ids with padding on the left and the matching attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(np.asarray(p, dtype=np.int64))
        mask[i, width - len(p):] = 1
    return ids, mask


def cut_at_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Tokens up to and including the first EOS (generate pads finished rows after it)."""
    hits = np.flatnonzero(tokens == eos_id)
    return tokens[:hits[0] + 1] if len(hits) else tokens


@torch.no_grad()
def generate_responses(model: nn.Module, prompts: list[np.ndarray], *, pad_id: int, eos_id: int,
                       generate_kwargs: dict[str, Any], num_samples: int = 1, batch_size: int = 32,
                       seed: int | None = None, device: torch.device | str = "cpu") -> list[np.ndarray]:
    """``num_samples`` responses per prompt, prompt-major (``out[i * num_samples + j]``), each cut after
    its first EOS. ``seed`` reseeds torch before each generate call (batch ``b`` uses ``seed + b``)."""
    out: list[np.ndarray] = []
    synced = is_zero3(model) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    with eval_mode(model):
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[start:start + batch_size]
            ids, mask = left_pad(chunk, pad_id)
            if seed is not None:
                torch.manual_seed(seed + b)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad_id,
                                 eos_token_id=eos_id, num_return_sequences=num_samples, synced_gpus=synced,
                                 **generate_kwargs)
            new = gen[:, ids.size(1):].cpu().numpy().astype(np.int32)
            out.extend(cut_at_eos(row, eos_id) for row in new)
    return out


# ----------------------------------------------------------------------------------------------- cache key
def model_identity(source: str | None, revision: str | None, config_json: str, seed: int,
                   precision: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a model's weights without reading them: a local directory's weight files (name,
    size, mtime), a hub id and revision, or (no source: random init) its config and the init seed; with the
    model options that change its outputs (``options``: torch_dtype, attn_implementation; unset ones leave the
    identity as it was before these options existed)."""
    ident: dict[str, Any] = {"precision": precision}
    ident.update({k: v for k, v in (options or {}).items() if v is not None})
    if source is None:
        ident.update(random_init=hashlib.sha256(config_json.encode()).hexdigest()[:16], seed=seed)
    elif Path(source).is_dir():
        files = sorted(f for f in Path(source).iterdir()
                       if f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json"))
        ident.update(dir=str(Path(source).resolve()),
                     files=[(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    else:
        ident.update(hub=source, revision=revision)
    return ident


def generation_key(teacher: dict[str, Any], prompt_digest: str, tokenizer_fingerprint: str,
                   settings: dict[str, Any]) -> str:
    payload = json.dumps({"teacher": teacher, "prompts": prompt_digest, "tok": tokenizer_fingerprint,
                          "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------- cache files
class GenerationCache:
    """``root/generations/<key>.npz`` (flat token ids + offsets) and ``<key>.json`` (what and when)."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / "generations"

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.npz"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> list[np.ndarray]:
        with np.load(self.path(key)) as z:
            flat, offsets = z["tokens"], z["offsets"]
        return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]

    def save(self, key: str, responses: list[np.ndarray], meta: dict[str, Any]) -> Path:
        """Write atomically (temp file + rename): readers never see a partial file; concurrent writers of
        the same key write the same content, the last rename wins."""
        self.dir.mkdir(parents=True, exist_ok=True)
        offsets = np.zeros(len(responses) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(r) for r in responses])
        flat = np.concatenate(responses).astype(np.int32) if responses else np.zeros(0, np.int32)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, tokens=flat, offsets=offsets)
        meta_tmp = self.dir / f"{key}.json.tmp{os.getpid()}"
        meta_tmp.write_text(json.dumps({**meta, "created": time.time()}, indent=2))
        os.replace(meta_tmp, self.dir / f"{key}.json")
        os.replace(tmp, self.path(key))
        return self.path(key)


# ----------------------------------------------------------------------------------------------- distributed
def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, per_rank): rank ``rank`` owns ``[start, stop)``; every rank runs ``per_rank`` items
    (padding its shard when it is short) so collective forward passes stay in lockstep."""
    per = -(-n // world)
    start = min(rank * per, n)
    return start, min(start + per, n), per


def padded_shard(items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's items padded to the common length with copies of the first item; (items, real count)."""
    start, stop, per = shard_bounds(len(items), rank, world)
    mine = items[start:stop]
    return mine + [items[0]] * (per - len(mine)), len(mine)


def on_policy_draw(seed: int, step: int, micro: int, probability: float) -> bool:
    """Whether micro-batch ``micro`` of optimizer ``step`` is answered by the student (regime c): a uniform
    draw from (seed, step, micro) below ``probability``. No rank in the seed: every rank decides alike."""
    if probability <= 0:
        return False
    return bool(np.random.default_rng([seed & 0xFFFFFFFF, step, micro, 0x6F6E]).random() < probability)
