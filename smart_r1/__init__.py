"""smart-r1: tokenized multi-agent traffic simulation fine-tuned with SFT -> RFT (MPO) -> SFT."""

__version__ = "0.1.0"
