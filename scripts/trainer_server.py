"""Serve homefire trainers on the Tinker wire protocol: the official ``tinker`` client (0.38) and
code written against it (tinker-cookbook) train on this machine.

    python scripts/trainer_server.py --base-model homefire/tiny-qwen3 --port 8000
    TINKER_API_KEY=tml-local python my_tinker_script.py   # ServiceClient(base_url="http://127.0.0.1:8000")

Checkpoints land in the store (``--storage-root``) in the layout the recipes use, as
``tinker://<run_id>/weights/<name>`` and ``.../sampler_weights/<name>``. See docs/server.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", action="append", required=True,
                        help="a model clients may train and sample (repeat for several): a "
                             "built-in tiny model, HF directory or hub id, or a promoted model")
    parser.add_argument("--storage-root", help="checkpoint store (default: "
                                               "$HOMEFIRE_STORAGE_ROOT or ~/.cache/homefire/store)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", action="append",
                        help="require this X-API-Key on every request; repeat for several "
                             "tenants, each of which sees only its own runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mixed-precision", default="auto",
                        choices=["auto", "bf16", "fp16", "no"])
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("homefire.server")

    import uvicorn

    from training.server.app import create_app
    from training.server.service import TrainerService

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("binding %s without --api-key: anyone who can reach this port can train "
                    "and read checkpoints", args.host)
    service = TrainerService(args.base_model, args.storage_root, device=args.device,
                             mixed_precision=args.mixed_precision)
    threading.Thread(target=service.warm_up, name="homefire-warm-up", daemon=True).start()
    app = create_app(service, api_key=args.api_key)
    log.info("homefire trainer server at http://%s:%d (base models: %s; store: %s)",
             args.host, args.port, ", ".join(service.base_models), service.store.root_url)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    access_log=False)
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
