"""Packing token streams into fixed-length blocks, and deterministic batches for each worker.

Batches are a pure function of (seed, step, micro-step, rank): a resumed run sees exactly the batches an
uninterrupted run would have seen, and workers never overlap. The blocks are either in memory (``Blocks``)
or read at random from token shards on storage (``shards.ShardedBlocks``, what ``prepare`` hands out); a
sampler over shards asks the kernel to read the next micro-step's rows ahead while the current one trains."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raydistill.data.masking import mask_tokens, next_token_labels


def step_seed(*parts: int) -> int:
    """A 32-bit seed from integers (numpy's SeedSequence), e.g. (train.seed, step): the training loop's per-step
    randomness, and what the teacher cache's fill draws the same tail samples with."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class Blocks:
    """Packed token ids ``[N, block_size]`` and each row's real length (the rest is padding)."""

    ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths) of the rows ``idx``."""
        return self.ids[idx], self.lengths[idx]


def pack(docs: list[list[int]], block_size: int, *, pad_id: int, bos_id: int | None, eos_id: int | None,
         sep_id: int | None = None, cls_id: int | None = None) -> Blocks:
    """Concatenate documents and cut the stream into blocks.

    Encoders: each block is ``[CLS] tokens [SEP]``, documents separated by [SEP]. Decoders: documents are
    separated by EOS (bos/eos as the tokenizer defines). The last partial block is kept, padded."""
    encoder = cls_id is not None and sep_id is not None
    sep = sep_id if encoder else eos_id
    stream: list[int] = []
    for doc in docs:
        if not doc:
            continue
        if not encoder and bos_id is not None and bos_id != eos_id:
            stream.append(bos_id)
        stream.extend(doc)
        if sep is not None:
            stream.append(sep)
    body = block_size - 2 if encoder else block_size
    n = (len(stream) + body - 1) // body
    ids = np.full((max(n, 0), block_size), pad_id, dtype=np.int32)
    lengths = np.zeros(max(n, 0), dtype=np.int32)
    for i in range(n):
        chunk = stream[i * body:(i + 1) * body]
        row = [cls_id, *chunk, sep_id] if encoder else chunk
        ids[i, :len(row)] = row
        lengths[i] = len(row)
    return Blocks(ids, lengths)


@dataclass(frozen=True)
class TokenInfo:
    """The few tokenizer facts batching needs (picklable, no tokenizer object)."""

    is_encoder: bool
    vocab_size: int
    pad_id: int
    mask_id: int | None
    special_ids: tuple[int, ...]


class BatchSampler:
    """Deterministic per-worker batches over a packed corpus, reshuffled each epoch."""

    def __init__(self, blocks: Blocks, info: TokenInfo, *, batch_size: int, grad_accum: int, rank: int,
                 world_size: int, seed: int, mlm_probability: float = 0.15):
        if len(blocks) == 0:
            raise ValueError("the corpus packed into zero blocks")
        self.blocks, self.info = blocks, info
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.mlm_probability = mlm_probability
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        return self._perms[epoch]

    def stream_positions(self, step: int, micro: int) -> np.ndarray:
        """Positions in the run's stream of samples for 1-based optimizer ``step`` and micro-step ``micro`` on
        this rank. An optimizer step covers ``batch_size x grad_accum x world_size`` consecutive positions,
        micro-step by micro-step and rank by rank, so the same positions make up a step however it is split
        over micro-batches and workers."""
        per_micro = self.batch_size * self.world_size
        start = ((step - 1) * self.grad_accum + micro) * per_micro + self.rank * self.batch_size
        return np.arange(start, start + self.batch_size, dtype=np.int64)

    def indices(self, step: int, micro: int) -> np.ndarray:
        """Block indices for 1-based optimizer ``step`` and micro-step ``micro`` on this rank."""
        n = len(self.blocks)
        return np.array([self._perm(int(pos // n))[pos % n] for pos in self.stream_positions(step, micro)],
                        dtype=np.int64)

    def batch(self, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        positions = self.stream_positions(step, micro)
        out = self.make_batch(self.indices(step, micro), [[self.seed, step, int(p)] for p in positions], positions)
        prefetch = getattr(self.blocks, "prefetch", None)
        if prefetch is not None:  # shards: the kernel reads the next micro-step's rows while this one trains
            prefetch(self.indices(*((step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0))))
        return out

    def _rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(self.blocks, "take"):
            return self.blocks.take(idx)
        return self.blocks.ids[idx], self.blocks.lengths[idx]

    def make_batch(self, idx: np.ndarray, row_seeds: list[list[int]], sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``idx`` with their targets. Each row's MLM masking is drawn from its own seed, and
        ``sample_ids`` (the rows' stream positions) travel with the batch for objectives that key per-example
        randomness on them: a sequence is masked the same way whichever micro-batch or worker it lands in."""
        rows, row_lengths = self._rows(np.asarray(idx))
        ids = torch.from_numpy(rows.astype(np.int64))
        lengths = torch.from_numpy(row_lengths.astype(np.int64))
        attention = (torch.arange(ids.size(1))[None, :] < lengths[:, None]).long()
        out = {"sample_ids": torch.from_numpy(np.asarray(sample_ids, dtype=np.int64))}
        special = torch.isin(ids, torch.tensor(self.info.special_ids)) | ~attention.bool()
        if self.info.is_encoder:
            gens = [torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
                    for seed in row_seeds]
            inputs, labels = mask_tokens(ids, special, self.info.mask_id, self.info.vocab_size,
                                         self.mlm_probability, gens)
            return {**out, "input_ids": inputs, "attention_mask": attention, "labels": labels,
                    "special_tokens_mask": special.long()}
        return {**out, "input_ids": ids, "attention_mask": attention, "labels": next_token_labels(ids, attention),
                "special_tokens_mask": special.long()}

    def eval_batches(self, num_batches: int, seed: int):
        """A fixed set of batches (this rank's share), identical at every evaluation.

        Every rank yields the same number of batches (sharded models run collectives in forward), so a
        small validation set wraps around instead of leaving some ranks idle."""
        n = len(self.blocks)
        per_round = self.world_size * self.batch_size
        for b in range(min(num_batches, -(-n // per_round))):
            start = b * per_round + self.rank * self.batch_size
            positions = np.arange(start, start + self.batch_size, dtype=np.int64)
            # Step 0 never trains: validation rows' seeds never collide with a training row's.
            yield self.make_batch(positions % n, [[seed, 0, int(p)] for p in positions], positions)
