"""Code that runs a model: block-by-block calibration, APoZ monitoring, the particle-filter layer search, lottery
rounds around a training loop, and holding masks while training. The math these drivers feed lives in
``inc_plugins.algorithms``; what a model looks like and how to cut it, in ``inc_plugins.models``."""
