"""Pure tensor math: scores, masks, search and tuning. Imports torch only (no INC, no transformers)."""
