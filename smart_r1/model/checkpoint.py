"""SMART-tiny checkpoints: weights, model config and motion vocabulary in one file that loads with
`torch.load(..., weights_only=True)` (config and vocabulary are stored as plain dicts and tensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.tokens.motion_vocab import MotionVocab

FORMAT = "smart-r1/smart-tiny/v1"


def save_checkpoint(path: str | Path, model: SmartTiny, extra: dict | None = None) -> None:
    """Write model weights, config and vocabulary; `extra` holds plain values (stage, epoch, loss)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "model_config": model.cfg.to_dict(), "vocab": model.vocab.to_dict(),
                "state_dict": state, "extra": dict(extra or {})}, path)


def load_checkpoint(path: str | Path, map_location="cpu", expect_config: ModelConfig | None = None,
                    expect_vocab: MotionVocab | None = None) -> SmartTiny:
    """The model of a checkpoint, in eval mode. ValueError with the reason when the file is not a
    SMART-tiny checkpoint, its weights do not fit its config, or it differs from what the caller
    expects (`expect_config`, `expect_vocab`)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a SMART-tiny checkpoint (expected format {FORMAT!r})")
    cfg = ModelConfig.from_dict(blob["model_config"])
    vocab = MotionVocab.from_dict(blob["vocab"])
    if expect_config is not None and cfg != expect_config:
        diff = {k: (v, getattr(expect_config, k)) for k, v in cfg.to_dict().items() if getattr(expect_config, k) != v}
        raise ValueError(f"checkpoint {path} was built for another model config; (checkpoint, expected): {diff}")
    if expect_vocab is not None and (expect_vocab.contours.shape != vocab.contours.shape
                                     or not torch.allclose(expect_vocab.contours, vocab.contours)):
        raise ValueError(f"checkpoint {path} was built for another motion vocabulary "
                         f"({vocab.size} tokens per type; expected {expect_vocab.size}, or different contours)")
    model = SmartTiny(cfg, vocab)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: weights do not fit its model config "
                         f"(vocab_size={cfg.vocab_size}, dim={cfg.dim}): {str(e).splitlines()[0]}") from e
    return model.to(map_location).eval()


def checkpoint_extra(path: str | Path) -> dict:
    """The `extra` dict saved with a checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=True).get("extra", {})
