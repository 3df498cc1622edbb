"""character-em: character as a latent variable behind emergent misalignment, as a Snakemake pipeline.

Modules are small and named for what they do. None imports torch at import time, so the
workflow's DAG builds without it.
"""

__version__ = "0.1.0"
