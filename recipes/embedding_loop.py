"""Command line for the embedding recipe: ``python -m recipes.embedding_loop key=value ...``
(Hydra).

The loop itself is ``training.recipes.embedding_loop``; this file only turns the command line
into its ``Config``. ``--help`` lists every field, ``--cfg job`` prints the resolved config.
"""

from recipes._hydra import run_recipe
from training.recipes.embedding_loop import Config, main

if __name__ == "__main__":
    run_recipe("embedding_loop", Config, main)
