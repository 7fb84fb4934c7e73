"""Hydra glue shared by the recipe command lines: a typed schema per recipe + configs/*.yaml."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def unknown_keys(cfg: Any, config_cls: type, prefix: str = "") -> Iterator[str]:
    """Keys of ``cfg`` (a DictConfig or dict) that are not fields of the dataclass
    ``config_cls``, nested configs included (``infra.nope``)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in cfg.keys():
        if key not in fields:
            yield f"{prefix}{key}"
        elif dataclasses.is_dataclass(hints.get(key)) and hasattr(cfg[key], "keys"):
            yield from unknown_keys(cfg[key], hints[key], f"{prefix}{key}.")


def run_recipe(name: str, config_cls: type, main: Callable[[Any], Any]) -> None:
    """Parse ``key=value`` overrides against ``config_cls`` and run ``main``.

    The dataclass is registered as the schema ``<name>_schema``: unknown keys and values of the
    wrong type are rejected by Hydra with the offending key named.
    """
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from training.sdk.distributed import RankLostError, shutdown

    ConfigStore.instance().store(name=f"{name}_schema", node=config_cls)

    @hydra.main(version_base=None, config_path=CONFIG_DIR, config_name=name)
    def _cli(cfg: DictConfig) -> None:
        # Hydra's "+key=value" appends a key the schema lacks instead of refusing it.
        unknown = list(unknown_keys(cfg, config_cls))
        if unknown:
            print(f"error: {name} has no field {', '.join(unknown)} (given as +key=value?); "
                  f"the fields are listed by --help and in docs/recipes/{name}.md",
                  file=sys.stderr)
            sys.exit(2)
        try:
            config = OmegaConf.to_object(cfg)
        except MissingMandatoryValue as e:
            key = e.full_key or "a required field"
            print(f"error: {key} is required (e.g. {key}=./runs/my_run)", file=sys.stderr)
            sys.exit(2)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            main(config)
            shutdown()  # leave the process group cleanly (torchrun): see its docstring
        except RankLostError as e:
            # Print now: torchrun stops this process within moments, often before a traceback
            # would be formatted.
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    _cli()
