"""Motion tokens (K-disk vocabulary, tokeniser), map segments, and tokenised scene batches."""
