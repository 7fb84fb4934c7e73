"""Command line for the SFT recipe: ``python -m recipes.sft_loop key=value ...`` (Hydra).

The loop itself is ``training.recipes.sft_loop``; this file only turns the command line into its
``Config``. ``--help`` lists every field, ``--cfg job`` prints the resolved config.
"""

from recipes._hydra import run_recipe
from training.recipes.sft_loop import Config, main

if __name__ == "__main__":
    run_recipe("sft_loop", Config, main)
