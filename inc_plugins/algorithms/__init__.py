"""Pure tensor math: scores, masks, channel selection, search and tuning. Tensors (or layers' weights) in, tensors
out: no model traversal, hooks, training loops, INC or transformers (``inc_plugins.execution`` runs models)."""
