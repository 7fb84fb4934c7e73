"""Serve a model over an OpenAI-compatible HTTP API, with hotload of sampler snapshots.

    python scripts/serve.py --base-model homefire/tiny-qwen3 --port 8000
    python scripts/serve.py --base-model accounts/local/models/my-model          # a promoted model
    python scripts/serve.py --base-model homefire/tiny-qwen3 \\
        --snapshot sampler://<job_id>/<snapshot_name>                           # start on a snapshot

Then point any OpenAI client at ``http://127.0.0.1:8000/v1`` (any API key), and hotload newer
snapshots while it serves::

    curl -X POST localhost:8000/v1/hotload -d '{"snapshot": "sampler://<job>/<name>"}'
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.sdk.deployments import DeploymentManager  # noqa: E402  (after the path fix)
from training.sdk.serving import OpenAIServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", required=True,
                        help="built-in tiny model, HF directory or hub id, or a promoted model "
                             "accounts/<account>/models/<id>")
    parser.add_argument("--snapshot", help="sampler snapshot to load before serving "
                                           "(sampler://<job_id>/<snapshot_name>)")
    parser.add_argument("--storage-root", help="checkpoint store (default: "
                                               "$HOMEFIRE_STORAGE_ROOT or ~/.cache/homefire/store)")
    parser.add_argument("--model-name", help="model name clients send (default: --base-model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="auto", choices=["auto", "transformers", "vllm"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    manager = DeploymentManager(args.storage_root, device=args.device, engine=args.engine)
    deployment = manager.create_deployment(args.base_model, "serve")
    if args.snapshot:
        manager.sync(deployment.deployment_id, args.snapshot)
    server = OpenAIServer(manager, deployment.deployment_id, model_name=args.model_name,
                          host=args.host, port=args.port)
    print(f"serving {server.model_name} at {server.url}", flush=True)
    server.serve_forever()  # uvicorn stops on Ctrl-C / SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
