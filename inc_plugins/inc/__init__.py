"""The INC face of the plugins: the entry point (``entry``), one base for one-shot prunings (``one_shot_base``), one
small file per pruning type with its settings model, criteria and regularizers, and registration in one place
(``registry``)."""
