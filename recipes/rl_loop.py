"""Command line for the RL recipe: ``python -m recipes.rl_loop key=value ...`` (Hydra).

The loop itself is ``training.recipes.rl_loop``; this file only turns the command line into its
``Config``. ``--help`` lists every field, ``--cfg job`` prints the resolved config.
"""

from recipes._hydra import run_recipe
from training.recipes.rl_loop import Config, main

if __name__ == "__main__":
    run_recipe("rl_loop", Config, main)
