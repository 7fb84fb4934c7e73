"""Command line for the DPO recipe: ``python -m recipes.dpo_loop key=value ...`` (Hydra).

The loop itself is ``training.recipes.dpo_loop``; this file only turns the command line into its
``Config``. ``--help`` lists every field, ``--cfg job`` prints the resolved config.
"""

from recipes._hydra import run_recipe
from training.recipes.dpo_loop import Config, main

if __name__ == "__main__":
    run_recipe("dpo_loop", Config, main)
