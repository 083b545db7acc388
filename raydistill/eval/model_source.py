"""What MODEL names: a built-in preset (random init, tokenizer trained on the task's own training text),
a directory in save_pretrained layout, or a Hugging Face hub id; and building a task head on it with the
real Hugging Face ``AutoModelFor*`` classes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from raydistill.config import PRESETS
from raydistill.eval.errors import EvalConfigError
from raydistill.models.presets import ENCODER_PRESETS, preset_config


@dataclass(frozen=True)
class ModelSource:
    name: str  # as given (reported in the result rows)
    kind: str  # "preset", "dir" or "hub"
    location: str  # preset name, absolute directory or hub id
    encoder: bool

    @property
    def from_scratch(self) -> bool:
        return self.kind == "preset"


def resolve_model(name: str) -> ModelSource:
    """Check MODEL on the driver; a hub id is checked by fetching its config (needs the network)."""
    from raydistill.models.loading import is_encoder

    if name in PRESETS:
        return ModelSource(name, "preset", name, name in ENCODER_PRESETS)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise EvalConfigError(f"model directory {name!r} has no config.json (expected save_pretrained layout)")
        location = str(path.resolve())
        kind = "dir"
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise EvalConfigError(f"model {name!r}: no such directory; give a preset ({', '.join(PRESETS)}), a "
                              "save_pretrained directory or a Hugging Face hub id")
    else:
        location, kind = name, "hub"
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise EvalConfigError(f"model {name!r}: not a preset ({', '.join(PRESETS)}), and its config could not be "
                              f"loaded ({str(e).splitlines()[0]})") from None
    return ModelSource(name, kind, location, is_encoder(config))


def load_tokenizer(source: ModelSource, train_texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """The model's own tokenizer; for a preset, one trained on ``train_texts`` (WordPiece for encoders,
    byte-level BPE for decoders)."""
    from raydistill.data.tokenizer import load_tokenizer as load_named
    from raydistill.data.tokenizer import train_tokenizer

    if source.from_scratch:
        if not train_texts:
            raise EvalConfigError(f"preset {source.name}: no training text to train its tokenizer on")
        return train_tokenizer(train_texts, "wordpiece" if source.encoder else "bpe", vocab_size)
    return load_named(source.location)


def build_model(source: ModelSource, auto_class, tokenizer: PreTrainedTokenizerBase,
                **config_kwargs) -> PreTrainedModel:
    """``auto_class`` (e.g. AutoModelForSequenceClassification) on the source's weights; a preset gets a
    random init of its built-in config. ``config_kwargs`` set head fields such as ``num_labels``."""
    from raydistill.models.loading import special_ids

    if source.from_scratch:
        config = preset_config(source.location, len(tokenizer), special_ids(tokenizer))
        for key, value in config_kwargs.items():
            setattr(config, key, value)
        model = auto_class.from_config(config)
    else:
        try:
            model = auto_class.from_pretrained(source.location, **config_kwargs)
        except ValueError as e:  # e.g. an architecture without this head in transformers
            raise EvalConfigError(f"model {source.name!r} cannot take a {auto_class.__name__} head: "
                                  f"{str(e).splitlines()[0]}") from None
    # Sequence heads of decoders find the last real token through pad_token_id.
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
