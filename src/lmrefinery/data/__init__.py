"""Data layer: files → records → conversations → token ids with response-only labels → named sources → batches."""
