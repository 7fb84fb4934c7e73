"""Command line for the ORPO recipe: ``python -m recipes.orpo_loop key=value ...`` (Hydra).

The loop itself is ``training.recipes.orpo_loop``; this file only turns the command line into its
``Config``. ``--help`` lists every field, ``--cfg job`` prints the resolved config.
"""

from recipes._hydra import run_recipe
from training.recipes.orpo_loop import Config, main

if __name__ == "__main__":
    run_recipe("orpo_loop", Config, main)
