"""Where an architecture keeps its transformer blocks, and reading/writing their outputs.

raydistill never copies model code: it finds the ``ModuleList`` of blocks of a Hugging Face model and
hooks it. Known layouts cover BERT-family encoders, GPT-2, Llama/Qwen2/Mistral, GPT-NeoX and OPT; any
other architecture works by naming its block list (``block_path``, e.g. ``model.layers``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from raydistill.errors import ConfigError

KNOWN_BLOCK_PATHS = (
    "bert.encoder.layer", "roberta.encoder.layer", "electra.encoder.layer", "encoder.layer",
    "distilbert.transformer.layer",
    "transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "layers", "h",
)


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_blocks(model: nn.Module, block_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, ModuleList) of the model's transformer blocks."""
    if block_path:
        blocks = _get(model, block_path)
        if not isinstance(blocks, nn.ModuleList):
            raise ConfigError(f"block_path {block_path!r} is not a ModuleList in {type(model).__name__}")
        return block_path, blocks
    for path in KNOWN_BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}; set the model's "
                      "block_path to the dotted name of its block ModuleList (e.g. 'model.layers')")


def block_hidden(output) -> torch.Tensor:
    """The residual-stream tensor of a block's output (a tensor, or a tuple whose first item it is)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def replace_block_hidden(output, hidden: torch.Tensor):
    """A block output with its residual-stream tensor replaced, in the same structure."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:]) if isinstance(output, tuple) else type(output)((hidden, *output[1:]))


def resolve_layer(index: int, depth: int, what: str) -> int:
    """Map a possibly negative block index into [0, depth) or raise a ConfigError naming the field."""
    resolved = index + depth if index < 0 else index
    if not 0 <= resolved < depth:
        raise ConfigError(f"{what}: layer {index} out of range; the model has {depth} blocks "
                          f"(allowed: {-depth}..{depth - 1})")
    return resolved


def num_layers(config) -> int:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    raise ConfigError(f"cannot tell the depth of a {type(config).__name__}")


def hidden_size(config) -> int:
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    raise ConfigError(f"cannot tell the hidden size of a {type(config).__name__}")


def set_num_layers(config, n: int) -> None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, attr):
            setattr(config, attr, n)
            # Some configs (Llama, Qwen2) keep a per-layer list that must match the depth.
            types = getattr(config, "layer_types", None)
            if types:
                config.layer_types = [types[min(i, len(types) - 1)] for i in range(n)]
            return
    raise ConfigError(f"cannot set the depth of a {type(config).__name__}")


class capture_block_outputs:
    """Context manager recording the output of the given blocks (0-indexed) during forward passes.

    ``with capture_block_outputs(model, {0, 3}) as hidden: model(...)`` leaves ``hidden[3]`` = block 3's
    residual-stream output. Hooks are removed on exit, also when the forward raises."""

    def __init__(self, model: nn.Module, layers, block_path: str | None = None):
        self.model, self.layers, self.block_path = model, sorted(set(layers)), block_path
        self.hidden: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> dict[int, torch.Tensor]:
        if self.layers:
            _, blocks = find_blocks(self.model, self.block_path)
            for i in self.layers:
                self._handles.append(blocks[i].register_forward_hook(self._hook(i)))
        return self.hidden

    def _hook(self, index: int):
        def hook(module, args, output):
            self.hidden[index] = block_hidden(output)
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def output_head(model: nn.Module) -> nn.Module:
    """The module mapping the final hidden state to the logits (``get_output_embeddings``), with a V x H weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or len(getattr(weight, "ds_shape", weight.shape)) != 2:
        raise ConfigError(f"{type(model).__name__} has no linear output head (get_output_embeddings() gives "
                          f"{type(head).__name__}); objectives that read the head (td with fused_head) need one: "
                          "set fused_head=false")
    return head


@contextmanager
def capture_input(module: nn.Module, keep: bool = True,
                  select: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``module``'s first input during its calls (``captured['hidden']``). With ``keep=False`` the
    module is handed zero positions of it (dim -2) instead, so it computes nothing; with ``select`` (batch
    rows, positions) only those positions, as one sequence (1 x N x H). The module still runs, so other hooks
    on it (DeepSpeed's parameter gathering) and anything the model applies to its output (a logit softcap)
    behave as in any call. The hook is removed on exit, also when the call raises."""
    captured: dict[str, torch.Tensor] = {}

    def hook(mod, args):
        captured["hidden"] = args[0]
        if select is not None:
            return (args[0][select].unsqueeze(0), *args[1:])
        return None if keep else (args[0][..., :0, :], *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Models in eval mode (no dropout) inside the block; each one's training flag restored afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
