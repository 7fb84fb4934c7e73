"""Reinforcement learning with GRPO-family losses and rollouts from a hot-loaded deployment,
resumable: rerun with the same ``log_path`` to continue.

Python::

    from training.recipes.rl_loop import Config, main
    main(Config(log_path="./my_rl", dataset="prompts.jsonl", reward_fn="numeric_answer"))

Command line (Hydra)::

    python -m recipes.rl_loop log_path=./my_rl dataset=prompts.jsonl reward_fn=numeric_answer

Data: prompt rows (``messages`` ending where the model answers, plus ground-truth fields) as in
:mod:`training.utils.rl_data`; the reward is a built-in or ``module:function``
(:mod:`training.utils.rewards`). The default runs the bundled toy task: write words that start
with the letter s, scored by the fraction of the completion that does.

Each step:

1. the deployment serves the current policy weights (synced by :class:`WeightSyncer` after
   every optimizer step: a base snapshot first, deltas after);
2. ``group_size`` completions of each of ``batch_size`` prompts are sampled with their
   inference log-probs, seeded by ``(seed, step, data position)`` only;
3. rewards become group-normalized advantages; groups whose rewards are all equal are dropped
   (counted in ``filtered_group_fraction``);
4. one ``forward_backward_custom`` with the configured loss (:mod:`training.utils.rl_losses`)
   and one optimizer step.

Resume restores weights, optimizer, step, the data cursor and the RNGs; the deployment is then
synced to the resumed weights (a base snapshot) before the first sample, and since sampling
seeds depend only on ``(seed, step, position)`` the resumed run samples, and trains on, exactly
what the uninterrupted run did. With ``off_policy=true`` the sampling of step k+1 runs while
step k trains (max staleness one optimizer step); the prefetched rollouts are saved with each
checkpoint, so resume stays exact in that mode too.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from training.sdk import (
    CustomLossFn,
    Datum,
    Engine,
    GradAccNormalization,
    OptimStepResponse,
    SamplingClient,
    SamplingParams,
    ServiceClient,
    TrainingClient,
    WeightSyncer,
    distributed,
    make_snapshot_identity,
    vllm_available,
)
from training.utils.config import ConfigError, TrainConfig, validate_common
from training.utils.data import SupervisedDataset
from training.utils.lr_schedule import LRSchedule
from training.utils.rewards import RewardFn, call_reward, load_reward_fn, required_fields
from training.utils.rl_data import (
    SAMPLE_RL_PROMPTS_PATH,
    RLPrompt,
    Rollout,
    RolloutBatch,
    RolloutLog,
    completion_mask,
    load_rl_prompts,
    rollout_datum,
    sampling_seed,
)
from training.utils.rl_losses import (
    RL_LOSSES,
    RLLoss,
    group_advantages,
    policy_loss,
    resolve_clip,
)
from training.utils.run import ResumableRun, RunResult, load_run_tokenizer

logger = logging.getLogger(__name__)

@dataclass(kw_only=True)
class Config(TrainConfig):
    """RL settings: the shared :class:`TrainConfig` fields plus these. The defaults run the
    bundled toy task on the tiny model (30 steps; under a minute on 2 idle CPU cores)."""

    dataset: str = str(SAMPLE_RL_PROMPTS_PATH)
    """Prompt rows: a JSONL file or any `datasets` source, each with 'messages' ending where
    the model answers plus the fields the reward reads. Default: the bundled toy task."""
    reward_fn: str = "regex_coverage"
    """A built-in reward ('exact_match', 'numeric_answer', 'regex_match', 'regex_coverage') or
    'package.module:function' taking (row, completion) and returning a float."""
    batch_size: int = 8
    """Prompts per optimizer step (each sampled group_size times)."""
    group_size: int = 8
    """Completions sampled per prompt (>= 2: advantages are relative to the group)."""
    max_completion_tokens: int = 16
    """Longest completion, in tokens (the prompt gets max_seq_len minus this)."""
    temperature: float = 1.0
    """Sampling temperature (> 0). The losses assume inference log-probs at temperature 1."""
    engine: Engine = Engine.auto
    """Inference engine of the rollouts: 'auto' (vLLM where installed with a CUDA GPU, else
    transformers), 'transformers' or 'vllm' (refused at start where it cannot run)."""
    epochs: int = 2
    """Passes over the prompts (2 x 120 bundled prompts / batch 8 = 30 steps)."""
    learning_rate: float = 2e-3
    """Peak learning rate. 2e-3 suits the tiny demo model; real models want ~1e-6 (full) or
    ~1e-5 (LoRA)."""
    lr_schedule: LRSchedule = LRSchedule.constant
    loss: RLLoss = RLLoss.grpo
    """'grpo' (PPO clip + truncated IS), 'dapo' (asymmetric clip), 'gspo' (sequence-level
    ratio), 'cispo' (clipped IS-weighted REINFORCE) or 'importance_sampling' (formulas in
    training.utils.rl_losses); or 'ppo' / 'dro': the trainer's built-in losses with Tinker's
    semantics (training.sdk.losses; no KL penalty, no truncated IS)."""
    dro_beta: float = 0.05
    """Weight of the quadratic penalty of loss='dro'."""
    clip_eps_low: float | None = None
    """Lower clip: ratios below 1 - clip_eps_low are clipped. None: the loss's default (0.2; gspo
    3e-4; cispo 1.0 = no lower bound)."""
    clip_eps_high: float | None = None
    """Upper clip: ratios above 1 + clip_eps_high are clipped. None: clip_eps_low if set, else
    the loss's default (0.2; dapo 0.28; gspo 4e-4; cispo 3.0)."""
    tis_cap: float = 2.0
    """Cap of the truncated importance-sampling weight min(pi_old / mu, tis_cap) that corrects
    trainer/inference log-prob mismatch (grpo, dapo, gspo); 0 turns it off."""
    kl_beta: float = 0.0
    """Weight of the per-token k3 KL penalty to a frozen copy of base_model; 0 = no reference
    model is loaded."""
    scale_advantages_by_std: bool = True
    """Divide advantages by the group's reward std (GRPO); false keeps only the mean baseline
    (Dr. GRPO)."""
    grad_accumulation_normalization: GradAccNormalization = GradAccNormalization.num_loss_tokens
    """'num_loss_tokens' (mean over completion tokens, DAPO's token-level mean),
    'num_sequences' or 'none'."""
    off_policy: bool = False
    """Sample step k+1 while step k trains (max staleness one optimizer step): faster, slightly
    off-policy; the losses then use the sampling log-probs as pi_old."""
    grad_clip_norm: float = 1.0


def validate(config: Config) -> None:
    validate_common(config)
    if config.engine == Engine.vllm and not vllm_available():
        raise ConfigError("engine=vllm needs the vllm package (pip install 'homefire[vllm]') and "
                          "a CUDA GPU; use engine=transformers or auto")
    if config.loss in BUILTIN_RL_LOSSES and config.kl_beta > 0:
        raise ConfigError(f"loss={config.loss!r} is the trainer's built-in loss, which has no "
                          f"KL term: set kl_beta=0, or use loss=grpo/dapo/gspo/cispo")
    if config.group_size < 2:
        raise ConfigError(f"group_size must be >= 2 (advantages are relative to the group), got "
                          f"{config.group_size}")
    if config.max_completion_tokens < 1:
        raise ConfigError(f"max_completion_tokens must be >= 1, got "
                          f"{config.max_completion_tokens}")
    if config.max_completion_tokens >= config.max_seq_len:
        raise ConfigError(f"max_completion_tokens={config.max_completion_tokens} leaves no room "
                          f"for the prompt in max_seq_len={config.max_seq_len}; raise max_seq_len")
    if not config.temperature > 0:
        raise ConfigError(f"temperature must be > 0 (RL needs sampled completions), got "
                          f"{config.temperature}")
    for name in ("clip_eps_low", "clip_eps_high"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be >= 0 (or null for the loss's default), got {value}")
    if config.tis_cap < 0:
        raise ConfigError(f"tis_cap must be >= 0 (0 = off), got {config.tis_cap}")
    if config.tis_cap and config.tis_cap < 1:
        raise ConfigError(f"tis_cap={config.tis_cap} is below 1: it would down-weight even "
                          f"tokens the trainer and sampler agree on; use >= 1 (2 is usual) or 0")
    if config.kl_beta < 0:
        raise ConfigError(f"kl_beta must be >= 0, got {config.kl_beta}")


# ------------------------------------------------------------------------------ sampling
class RolloutSampler:
    """Samples and scores one step's groups on the deployment.

    Args:
        sampler: a sampling client on the deployment the policy is synced to.
        prompts: every loaded prompt; ``dataset`` orders their indices.
        reward: the reward function.
        config: group size, completion length, temperature and seed.
    """

    def __init__(self, sampler: SamplingClient, prompts: list[RLPrompt],
                 dataset: SupervisedDataset[int], reward: RewardFn, config: Config) -> None:
        self.sampler = sampler
        self.prompts = prompts
        self.dataset = dataset
        self.reward = reward
        self.config = config

    def sample(self, step: int, data_consumed: int, batch_size: int) -> RolloutBatch:
        """The rollouts of 0-based ``step``: prompts at data positions ``data_consumed`` ..
        ``data_consumed + batch_size - 1``, each sampled ``group_size`` times.

        One engine call for the whole step (a per-prompt call was ~8x slower on CPU), seeded by
        :func:`sampling_seed` of ``(seed, step, data_consumed)``: the step's prompts and their
        order are a function of the same, so the samples are too.
        """
        config = self.config
        t0 = time.perf_counter()
        deployment = self.sampler.deployment
        positions = range(data_consumed, data_consumed + batch_size)
        indices = [self.dataset.example_at(p) for p in positions]
        params = SamplingParams(max_tokens=config.max_completion_tokens,
                                temperature=config.temperature,
                                seed=sampling_seed(config.seed, step, data_consumed))
        groups = deployment.sample([self.prompts[i].prompt_tokens for i in indices], params,
                                   config.group_size)
        synced = deployment.current_snapshot_identity
        tokenizer = deployment.tokenizer
        rollouts: list[Rollout] = []
        for position, index, group in zip(positions, indices, groups, strict=True):
            prompt = self.prompts[index]
            for seq in group:
                text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
                rollouts.append(Rollout(
                    prompt_index=index, position=position, prompt_tokens=prompt.prompt_tokens,
                    completion_tokens=list(seq.tokens), sampling_logprobs=list(seq.logprobs or []),
                    text=text, finish_reason=seq.stop_reason,
                    reward=call_reward(self.reward, prompt.row, text, prompt.where)))
        return RolloutBatch(rollouts=rollouts, group_size=config.group_size,
                            sample_seconds=time.perf_counter() - t0, synced_snapshot=synced)


# ------------------------------------------------------------------------------ training
def rl_objective(config: Config, on_policy: bool,
                 reference_logprobs: list[torch.Tensor] | None) -> CustomLossFn:
    """The ``forward_backward_custom`` loss of one step's datums (:func:`rollout_datum`)."""
    def loss_fn(datums: list[Datum], logprobs: list[torch.Tensor],
                ) -> tuple[torch.Tensor, dict[str, float]]:
        policy, sampling, advantages = [], [], []
        for datum, lp in zip(datums, logprobs, strict=True):
            mask = completion_mask(datum).to(lp.device)
            policy.append(lp[mask])
            sampling.append(datum.loss_fn_inputs["sampling_logprobs"].to_torch()
                            .reshape(-1).to(lp.device)[mask])
            advantages.append(datum.loss_fn_inputs["advantages"].to_torch().reshape(-1)[
                mask.cpu()][0])
        # On-policy the trainer still holds the weights that sampled (pi_old = pi_theta, no
        # grad); off-policy they are gone and the sampling log-probs stand in for pi_old.
        old = [lp.detach() for lp in policy] if on_policy else sampling
        out = policy_loss(policy, old, sampling, torch.stack(advantages), loss=config.loss,
                          clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high,
                          tis_cap=config.tis_cap, reference_logprobs=reference_logprobs,
                          kl_beta=config.kl_beta)
        return out.loss, {**out.metrics(), "num_loss_tokens": float(out.num_tokens)}
    return loss_fn


BUILTIN_RL_LOSSES = ("ppo", "dro")
"""Values of ``loss`` computed by the trainer's built-in losses (Tinker's semantics)."""


def builtin_loss_call(config: Config, datums: list[Datum],
                      ) -> tuple[list[Datum], dict[str, float]]:
    """The datums and ``loss_fn_config`` of ``forward_backward(datums, config.loss, ...)``:
    Tinker's RL inputs (``target_tokens``, the sampler's ``logprobs``, per-position
    ``advantages``, 0 on the prompt) and the clip range or ``beta``."""
    tinker_datums = [Datum(model_input=d.model_input, loss_fn_inputs={
        "target_tokens": d.loss_fn_inputs["target_tokens"],
        "logprobs": d.loss_fn_inputs["sampling_logprobs"],
        "advantages": d.loss_fn_inputs["advantages"]}) for d in datums]
    if config.loss == "dro":
        return tinker_datums, {"beta": config.dro_beta}
    low, high = resolve_clip("grpo", config.clip_eps_low, config.clip_eps_high)
    return tinker_datums, {"clip_low_threshold": 1 - low, "clip_high_threshold": 1 + high}


def reference_completion_logprobs(reference: TrainingClient,
                                  datums: list[Datum]) -> list[torch.Tensor]:
    """Per datum, the frozen reference's log-probs of its completion tokens (nats)."""
    output = reference.forward([Datum(model_input=d.model_input, loss_fn_inputs={
        k: d.loss_fn_inputs[k] for k in ("target_tokens", "weights")}) for d in datums]).result()
    return [out["logprobs"].to_torch().reshape(-1)[completion_mask(datum)]
            for out, datum in zip(output.loss_fn_outputs, datums, strict=True)]


def train_on(client: TrainingClient, run: ResumableRun, batch: RolloutBatch, step: int,
             config: Config, reference: TrainingClient | None,
             on_policy: bool) -> tuple[dict[str, Any], OptimStepResponse | None]:
    """Advantages, one forward_backward_custom and one optimizer step on ``batch``; returns the
    step's training metrics and the optimizer step's result (neither the loss metrics nor a
    result when every group was dropped)."""
    groups = group_advantages(batch.rewards, scale_by_std=config.scale_advantages_by_std)
    for i, rollout in enumerate(batch.rollouts):
        group = i // batch.group_size
        rollout.advantage = float(groups.advantages.reshape(-1)[i])
        rollout.trained = bool(groups.keep[group]) and len(rollout.completion_tokens) > 0
    trained = [r for r in batch.rollouts if r.trained]
    metrics: dict[str, Any] = {
        "filtered_groups": groups.num_filtered,
        "filtered_group_fraction": groups.num_filtered / groups.keep.numel(),
        "trained_sequences": len(trained)}
    if not trained:
        logger.warning("step %d: every group had equal rewards; no update this step", step + 1)
        return metrics, None
    t0 = time.perf_counter()
    datums = [rollout_datum(r) for r in trained]
    ref_logprobs = reference_completion_logprobs(reference, datums) if reference else None
    if config.loss in BUILTIN_RL_LOSSES:
        builtin_datums, loss_fn_config = builtin_loss_call(config, datums)
        fwd_bwd = client.forward_backward(builtin_datums, config.loss, loss_fn_config).result()
    else:
        fwd_bwd = client.forward_backward_custom(
            datums, rl_objective(config, on_policy, ref_logprobs)).result()
    optim = client.optim_step(run.adam_params(step), grad_accumulation_normalization=(
        config.grad_accumulation_normalization)).result()
    elapsed = time.perf_counter() - t0
    num_tokens = sum(d.model_input.length for d in datums)
    loss_tokens = fwd_bwd.metrics["num_loss_tokens"]
    loss_sum = fwd_bwd.metrics.get("loss_sum", fwd_bwd.metrics.get("loss:sum"))
    metrics.update({
        "loss": loss_sum / max(loss_tokens, 1),
        **{k: fwd_bwd.metrics[k] for k in ("clip_fraction", "tis_clip_fraction", "ratio_mean")
           if k in fwd_bwd.metrics},
        **({"kl": fwd_bwd.metrics["kl"]} if reference is not None else {}),
        "num_loss_tokens": loss_tokens, "train_time_s": elapsed,
        "train_tokens_per_s": num_tokens / elapsed})
    return metrics, optim


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Reward, length, stop and entropy statistics of a step's rollouts."""
    rewards = batch.rewards
    lengths = [len(r.completion_tokens) for r in batch.rollouts]
    sampled = [lp for r in batch.rollouts for lp in r.sampling_logprobs]
    tokens = batch.num_completion_tokens
    return {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
        "response_length": sum(lengths) / len(lengths),
        "stop_fraction": sum(r.finish_reason == "stop" for r in batch.rollouts) / len(lengths),
        # Mean -log mu of sampled tokens: an unbiased estimate of the per-token entropy at
        # temperature 1 (the full distributions are not returned by the engine).
        "entropy": -sum(sampled) / max(len(sampled), 1),
        "sample_time_s": batch.sample_seconds,
        "sample_tokens_per_s": tokens / batch.sample_seconds if batch.sample_seconds else 0.0}


# ------------------------------------------------------------------------------ weight sync
class PolicySync:
    """Keeps the deployment on the policy's current weights, one snapshot per sync.

    Each sync saves a sampler snapshot with :class:`WeightSyncer` (a base the first time,
    deltas after) and hot-loads it. The previous sync snapshot is deleted once the new one is
    served: the deployment and the delta chain keep their reference weights in memory, so only
    the newest snapshot is ever read again, and a long run's store stays one model in size.
    """

    def __init__(self, service: ServiceClient, client: TrainingClient, config: Config) -> None:
        service.config.engine = config.engine  # before the deployment is created
        self.sampler = service.create_sampling_client()
        self.store = service.store
        self.client = client
        self.syncer = WeightSyncer(policy_client=client, deploy_mgr=service.deploy_mgr,
                                   deployment_id=service.deployment_id,
                                   base_model=config.base_model, lora_rank=config.lora_rank,
                                   warmup_after_hotload=False)
        self._previous: str | None = None

    def sync(self, step: int, checkpoint_type: str | None = None) -> str:
        """Serve the current weights (after ``step`` optimizer steps); returns the identity."""
        name = self.syncer.save_and_hotload(f"rl-sync-{step}", checkpoint_type=checkpoint_type)
        if self._previous is not None:
            previous = self.store.sampler_dir(self.client.job_id, self._previous)
            distributed.on_main(lambda: self.store.delete(previous))
        self._previous = name
        return make_snapshot_identity(self.client.job_id, name)


# ------------------------------------------------------------------------------ the loop
def main(config: Config) -> RunResult:
    validate(config)

    # ---- data and reward: validated before any model is loaded
    reward = load_reward_fn(config.reward_fn)
    tokenizer = load_run_tokenizer(config)
    prompts, stats = load_rl_prompts(
        config.dataset, tokenizer, split=config.dataset_split, required_fields=required_fields(
            reward), max_prompt_tokens=config.max_seq_len - config.max_completion_tokens)
    dataset = SupervisedDataset(list(range(len(prompts))), seed=config.seed)
    clip_low, clip_high = resolve_clip(config.loss if config.loss in RL_LOSSES else "grpo",
                                       config.clip_eps_low, config.clip_eps_high)

    # ---- resume point, or nothing left to do
    with ResumableRun(config, recipe="rl_loop", dataset=dataset, identity={
            "reward_fn": config.reward_fn, "group_size": config.group_size,
            "max_completion_tokens": config.max_completion_tokens,
            "temperature": config.temperature, "engine": config.engine, "loss": config.loss,
            "clip": [clip_low, clip_high], "tis_cap": config.tis_cap,
            "kl_beta": config.kl_beta, "off_policy": config.off_policy,
            **({"dro_beta": config.dro_beta} if config.loss == "dro" else {})}) as run:
        if run.complete_row is not None:
            return run.finish_complete()
        client = run.start(summary=f"{stats.summary()}, {config.group_size} samples each, "
                                   f"loss {config.loss}")
        pool = ThreadPoolExecutor(max_workers=1) if config.off_policy else None
        try:
            # ---- deployment on the (resumed) policy weights: a base snapshot before any sample
            assert run.service is not None
            sync = PolicySync(run.service, client, config)
            sync.sync(run.step, checkpoint_type="base")
            reference = (run.service.create_reference_client(config.base_model,
                                                             lora_rank=config.lora_rank)
                         if config.kl_beta > 0 else None)
            rollouts = RolloutSampler(sync.sampler, prompts, dataset, reward, config)
            rollout_log = RolloutLog(config.log_path, start_step=run.step)
            # Off-policy: rollouts of the next step sampled while this one trained, saved with
            # each checkpoint so a resumed run trains on exactly what the uninterrupted one
            # would have.
            pending: RolloutBatch | None = run.user_state.get("pending_rollouts")

            def batch_size_at(position: int) -> int:
                return min(config.batch_size, run.data_limit - position)

            # ---- training loop: sample groups, score, one optimizer step
            for step in run.steps():
                batch = pending or rollouts.sample(step, run.data_consumed,
                                                   batch_size_at(run.data_consumed))
                pending = None
                consumed = len(batch.rollouts) // config.group_size
                next_consumed = run.data_consumed + consumed
                prefetch: Future[RolloutBatch] | None = None
                if pool is not None and step + 1 < run.total_steps:
                    prefetch = pool.submit(rollouts.sample, step + 1, next_consumed,
                                           batch_size_at(next_consumed))
                metrics, optim = train_on(client, run, batch, step, config, reference,
                                          on_policy=pool is None)
                if prefetch is not None:
                    pending = prefetch.result()
                if step + 1 < run.total_steps:
                    sync.sync(step + 1)
                rollout_log.append(step + 1, batch, prompts)
                run.end_step({**rollout_metrics(batch), **metrics,
                              "sampled_from": batch.synced_snapshot},
                             consumed=consumed, optim=optim,
                             show=("reward_mean", "filtered_group_fraction"),
                             user_state=({"pending_rollouts": pending} if pending is not None
                                         else None))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return run.finish()
