"""What each model family looks like (blocks, heads, key/value groups, FFN neurons, channels, activations), how to
cut pruned units out of it (``surgery_transformers``, ``surgery_cnn``) and how to save and load the cut models
(``saving``)."""
