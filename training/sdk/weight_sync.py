"""WeightSyncer: save sampler snapshots and hot-load them onto a deployment, base then deltas.

The delta chain itself lives in the training client (which snapshot the next delta
references); the syncer decides each save's type and pushes it::

    syncer = WeightSyncer(policy_client=training_client, deploy_mgr=deploy_mgr,
                          deployment_id="my-deployment", base_model=base_model)
    for step in range(steps):
        ...  # train
        syncer.save_and_hotload(f"step-{step:05d}")   # base first, deltas after
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from training.sdk.deployments import DeploymentManager, HotloadError
from training.sdk.snapshots import SnapshotType
from training.sdk.store import StoreError
from training.sdk.training_client import TrainingClient

logger = logging.getLogger(__name__)

__all__ = ["WeightSyncer"]


@dataclass
class WeightSyncer:
    """Checkpoint-then-sync lifecycle with automatic base/delta chain tracking.

    Fields follow the hosted SDK. ``deploy_mgr=None`` saves without syncing.
    """

    policy_client: TrainingClient
    deploy_mgr: DeploymentManager | None = None
    deployment_id: str | None = None
    base_model: str = ""
    """Checked against the deployment's base model at each hotload; empty: not checked."""
    hotload_timeout: int = 600
    """Seconds a hotload may wait for in-flight requests before it fails."""
    first_checkpoint_type: str = "base"
    compression_format: str = "arc_v2"
    warmup_after_hotload: bool = True
    warmup_max_retries: int = 10
    reset_prompt_cache: bool = True
    lora_rank: int = 0
    """> 0 forces every snapshot to ``base`` (adapters are standalone: no delta chain)."""
    last_hotload_error: Exception | None = field(default=None, init=False)
    """Why the last :meth:`hotload` returned False."""

    def __post_init__(self) -> None:
        if self.compression_format != "arc_v2":
            raise ValueError(f"compression_format={self.compression_format!r}: only 'arc_v2' "
                             f"(zstd deltas) exists")
        self.first_checkpoint_type = SnapshotType.parse(self.first_checkpoint_type,
                                                        "first_checkpoint_type")
        if self.deploy_mgr is not None and self.deployment_id is None:
            raise ValueError("WeightSyncer got a deploy_mgr but no deployment_id to sync to")

    # ------------------------------------------------------------------ saving
    def _choose_type(self, checkpoint_type: str | None) -> str:
        if self.lora_rank > 0:
            return "base"
        if checkpoint_type is not None:
            return checkpoint_type
        head = self.policy_client.sampler_chain_head
        if head is None:
            return self.first_checkpoint_type
        held = self.check_deployment_state() if self.deploy_mgr is not None else head
        if held != head:
            # A delta on `head` would be refused: the deployment holds something else (a
            # failed hotload, a save_only, a scale-to-zero). A base re-anchors the chain.
            logger.info("deployment %s holds %s, not the chain head %s: saving a base",
                        self.deployment_id, held, head)
            return "base"
        return "delta"

    def save_only(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save a sampler snapshot without syncing; returns its ``snapshot_name``."""
        resolved = self._choose_type(checkpoint_type)
        result = self.policy_client.save_weights_for_sampler_ext(name, checkpoint_type=resolved)
        return result.snapshot_name

    # ------------------------------------------------------------------ syncing
    def hotload(self, snapshot_name: str, checkpoint_type: str | None = None) -> bool:
        """Sync a saved snapshot (name or identity) onto the deployment.

        Returns True once it is served; False when the deployment refused it or the store has no
        such snapshot (it keeps serving its previous weights; the reason is in
        :attr:`last_hotload_error` and the log).
        ``checkpoint_type`` is informational: the snapshot's own files say what it is.
        """
        del checkpoint_type
        if self.deploy_mgr is None:
            raise ValueError("WeightSyncer has no deploy_mgr: nothing to hotload onto")
        try:
            self.deploy_mgr.hotload(
                self.deployment_id, snapshot_name, base_model=self.base_model or None,
                default_job_id=self.policy_client.job_id, timeout_s=self.hotload_timeout,
                reset_prompt_cache=self.reset_prompt_cache, warmup=self.warmup_after_hotload,
                warmup_max_retries=self.warmup_max_retries)
        except (HotloadError, StoreError, ValueError) as e:
            # A refused snapshot, one the store does not have (unknown or expired), or a
            # malformed name: the deployment keeps serving what it had.
            self.last_hotload_error = e
            logger.error("hotload of %s onto %s failed: %s", snapshot_name, self.deployment_id, e)
            return False
        self.last_hotload_error = None
        return True

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save (base first, then deltas) and sync; returns the ``snapshot_name``.

        Raises:
            HotloadError: the deployment refused the snapshot (it keeps its old weights; the
                next call saves a base to re-anchor the chain).
        """
        snapshot_name = self.save_only(name, checkpoint_type)
        if self.deploy_mgr is not None and not self.hotload(snapshot_name):
            raise self.last_hotload_error
        return snapshot_name

    def check_deployment_state(self) -> str | None:
        """The deployment's ``current_snapshot_identity`` (None: base model weights or no sync)."""
        if self.deploy_mgr is None:
            return None
        return self.deploy_mgr.current_snapshot_identity(self.deployment_id)

    def wait_for_hotload_ready(self, timeout_s: float = 300, poll_interval_s: float = 5) -> None:
        """Block until the deployment can take a hotload (raises HotloadTimeoutError)."""
        if self.deploy_mgr is not None:
            self.deploy_mgr.wait_for_hotload_ready(self.deployment_id, timeout_s,
                                                   poll_interval_s)

    def reset_delta_chain(self) -> None:
        """Make the next save a base (e.g. when the deployment was replaced under you)."""
        self.policy_client.reset_sampler_chain()
