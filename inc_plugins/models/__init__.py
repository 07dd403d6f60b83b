"""How to find blocks, heads, neurons and channels in each model family."""
