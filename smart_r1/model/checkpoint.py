"""SMART-tiny checkpoints: weights, model config and motion vocabulary in one file that loads with
`torch.load(..., weights_only=True)` (config and vocabulary are stored as plain dicts and tensors)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.storage import read_bytes, save_torch
from smart_r1.tokens.motion_vocab import MotionVocab

FORMAT = "smart-r1/smart-tiny/v1"


def save_checkpoint(path: str | Path, model: SmartTiny, extra: dict | None = None) -> None:
    """Write model weights, config and vocabulary; `extra` holds plain values (stage, epoch, loss)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch({"format": FORMAT, "model_config": model.cfg.to_dict(), "vocab": model.vocab.to_dict(),
                "state_dict": state, "extra": dict(extra or {})}, path)  # atomically: never half a file


def _reason(e: BaseException) -> str:
    """`Type: message` of an exception, on one line (torch's messages run over several)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {' '.join(lines[:2])[:300]}"


Source = str | Path | bytes  # a checkpoint file, or its bytes (as sent through Ray's object store)


def checkpoint_bytes(path: str | Path) -> bytes:
    """The bytes of a checkpoint file (a local path or a storage URI, e.g. in a run's bucket),
    after checking they hold a whole SMART-tiny checkpoint (ValueError as `load_checkpoint`): what
    the driver `ray.put`s for learners and rollout actors, which load it with
    `load_checkpoint(bytes)` (checked again there) instead of reading a path."""
    data = read_bytes(path)
    _read(data, name=str(path))
    return data


def _read(source: Source, map_location="cpu", name: str | None = None) -> dict:
    """The dict a checkpoint (a file, or its bytes) holds; ValueError naming it when it is damaged
    or not a SMART-tiny checkpoint (FileNotFoundError when the file does not exist).

    torch.load does not check the CRC32 that torch.save writes for every record of its zip file, so
    a flipped bit in the weights would load unnoticed: zipfile checks them first (a second read of
    the file, cheap next to building the model)."""
    path = name or ("checkpoint bytes" if isinstance(source, bytes) else source)
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
            damaged = archive.testzip()
        blob = None if damaged else torch.load(io.BytesIO(source) if isinstance(source, bytes) else source,
                                               map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile and torch.load raise many types on a damaged or foreign file
        raise ValueError(f"{path} is not a readable SMART-tiny checkpoint ({_reason(e)})") from e
    if damaged:
        raise ValueError(f"{path} is damaged: record {damaged} fails its CRC check (corrupt or partly written)")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a SMART-tiny checkpoint (expected format {FORMAT!r})")
    return blob


def load_checkpoint(path: Source, map_location="cpu", expect_config: ModelConfig | None = None,
                    expect_vocab: MotionVocab | None = None) -> SmartTiny:
    """The model of a checkpoint (a file, or its bytes from `checkpoint_bytes`), in eval mode.
    ValueError naming the file and the reason when the file is damaged or not a SMART-tiny
    checkpoint, its weights do not fit its config, or it differs from what the caller expects
    (`expect_config`, `expect_vocab`)."""
    blob = _read(path, map_location)
    if isinstance(path, bytes):
        path = "checkpoint bytes"  # for the messages below
    try:
        cfg = ModelConfig.from_dict(blob["model_config"])
        vocab = MotionVocab.from_dict(blob["vocab"])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path}: bad model config or vocabulary ({_reason(e)})") from e
    if expect_config is not None and cfg != expect_config:
        diff = {k: (v, getattr(expect_config, k)) for k, v in cfg.to_dict().items() if getattr(expect_config, k) != v}
        raise ValueError(f"checkpoint {path} was built for another model config; (checkpoint, expected): {diff}")
    if expect_vocab is not None and (expect_vocab.contours.shape != vocab.contours.shape
                                     or not torch.allclose(expect_vocab.contours, vocab.contours)):
        raise ValueError(f"checkpoint {path} was built for another motion vocabulary "
                         f"({vocab.size} tokens per type; expected {expect_vocab.size}, or different contours)")
    try:
        model = SmartTiny(cfg, vocab)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path}: weights do not fit its model config "
                         f"(vocab_size={cfg.vocab_size}, dim={cfg.dim}): {_reason(e)}") from e
    return model.to(map_location).eval()


def checkpoint_extra(path: str | Path) -> dict:
    """The `extra` dict saved with a checkpoint; ValueError as `load_checkpoint`."""
    extra = _read(path).get("extra", {})
    if not isinstance(extra, dict):
        raise ValueError(f"checkpoint {path}: 'extra' is a {type(extra).__name__}, not a dict")
    return extra


def load_weights(path: Source) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint (CPU tensors), e.g. to send to workers that already hold the
    model; ValueError as `load_checkpoint`."""
    weights = _read(path).get("state_dict")
    if not isinstance(weights, dict):
        raise ValueError(f"checkpoint {path}: no state dict")
    return weights
