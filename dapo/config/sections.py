"""The configuration's sections: frozen dataclasses with a docstring under every field, and the presets.

Every command reads its options from here (``dapo train``, ``eval``, ``sft``, ``ablate``): a flag such as
``--k 8`` is a shortcut for a key (``eval.k=8``), and ``key=value`` overrides work everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """HF model directory or hub id; empty = the built-in demo model for ``data.task`` (made by ``dapo sft``)."""
    tokenizer: str = ""
    """Tokenizer directory or hub id; empty = same as ``path``."""
    dtype: str = "auto"
    """Compute dtype of the forward and backward passes: auto (bfloat16 on CUDA, float32 on CPU), float32,
    bfloat16. The trained weights and AdamW's state stay float32 whatever this says (mixed precision, as
    the large frameworks do it); log-probs, entropy and importance ratios are computed in float32.
    float16 is refused: it needs loss scaling, which dapo does not do."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    trust_remote_code: bool = False
    """Run a model repository's own Python code. Off unless you trust the repository."""
    allow_unsafe_weights: bool = False
    """Allow pickle-based weight files (pytorch_model.bin); by default only safetensors load."""
    head_tf32: bool = False
    """Run the float32 LM head's matmuls (forward and backward, the log-probs' four V x H GEMMs per response
    token) with TF32 allowed on CUDA: ~8x the full-float32 rate on Ampere and later, inputs rounded to a 10-bit
    mantissa, float32 accumulation. Allowed inside the head only, never globally (the decoder computes in
    ``model.dtype`` anyway). Off by default until its effect on ``mismatch/logp_abs_diff`` is measured on a GPU;
    no effect on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa, eager, flash_attention_2."""
    lora_rank: int = 0
    """LoRA: train rank-r adapters (float32) on a frozen base instead of every weight; 0 = off (full
    fine-tuning). Needs peft (``pip install 'dapo[lora]'``). Under LoRA the frozen base is loaded in the
    compute dtype (``model.dtype``: bfloat16 on CUDA), only the adapters are in the optimiser, Ray workers
    receive only adapter tensors, checkpoints hold only the adapter (``dapo export RUN/step_N --merge OUT``
    writes a merged model), and the KL reference is the base with the adapters switched off."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: the update is (lora_alpha / lora_rank) * B A."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input in training forwards. Keep 0 for RL: a dropout makes the trainer's
    log-probs differ from the sampler's (dropout off) even on-policy, so ratios start away from 1."""
    lora_targets: tuple[str, ...] = ()
    """Modules to adapt, by name or dotted suffix (q_proj,v_proj or mlp.down_proj); empty = every nn.Linear of
    the attention and MLP blocks (never the LM head or embeddings)."""


@dataclass(frozen=True)
class DataConfig:
    task: str = "addition"
    """Built-in synthetic task used when ``path`` is empty (see ``dapo.data.tasks``)."""
    path: str = ""
    """Prompt file (JSONL, Parquet, CSV) or HF dataset; empty = the built-in task."""
    prompt_key: str = "prompt"
    """Column holding the prompt (a string, or chat messages as in DAPO-Math-17k)."""
    answer_key: str = "reward_model.ground_truth"
    """Column holding the ground truth; dotted for nested fields. Falls back to ``answer`` if absent."""
    template: str = "auto"
    """Prompt template: auto, none, dapo_math, boxed, chat, dapo_math+chat, boxed+chat. auto: a built-in task's
    own format; for files, dapo_math (+chat when the tokenizer has a chat template) with the math reward,
    else the tokenizer's chat template when it has one, else the prompt as it is (none)."""
    max_prompt_len: int = 1024
    """Prompts longer than this many tokens are handled by ``long_prompts``."""
    long_prompts: str = "drop"
    """drop (and count) or truncate (keep the last tokens)."""
    bad_rows: str = "error"
    """error (name the file and row) or skip (and count) for rows with a missing prompt or answer."""
    dedup: bool = False
    """Drop repeated prompts (DAPO-Math-17k repeats each about 100 times) and report how many."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by ``seed`` and the epoch)."""


@dataclass(frozen=True)
class RewardConfig:
    fn: str = "auto"
    """Verifier: auto (the built-in task's own, or math for files), math (DAPO math scoring), module:function
    or path/to/file.py:function, called as fn(response, ground_truth, **row_fields)."""
    workers: int = 0
    """Processes scoring rewards in parallel; 0 = in the trainer process. Training's responses reach them as
    token ids, which they decode to text themselves (a fast tokenizer's; at the recipe's scale decoding is
    tens of seconds of a step that then leave the trainer process)."""
    timeout_s: float = 5.0
    """Time limit per response; a timeout scores as wrong and is counted."""
    memory_mb: int = 0
    """Address-space limit (setrlimit) of each reward worker, in MB; a call that exceeds it scores as wrong and
    is counted. 0 = none. Needs ``workers`` > 0: user code in the trainer process cannot be limited."""


@dataclass(frozen=True)
class EvalConfig:
    path: str = ""
    """Held-out prompts (a file like ``data.path``); empty = held out of the built-in task or of ``data.path``."""
    size: int = 256
    """Held-out prompts evaluated before and after training (and every ``every`` steps)."""
    seed: int | None = None
    """Seed that draws the held-out prompts and their samples; None = ``seed``. Fix it to compare runs of
    different seeds on the same prompts with the same sampling seeds."""
    every: int = 0
    """Evaluate every N steps (0 = only before and after)."""
    k: int = 1
    """Samples per held-out prompt: accuracy is their mean (avg@k); also reported: pass@k, maj@k (paper: 32)."""
    temperature: float = 1.0
    """Sampling temperature of the evaluation (paper: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling of the evaluation (the paper evaluates AIME with 0.7; training samples with 1.0)."""


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "hf"
    """Rollout engine: hf (transformers, CPU or one GPU) or vllm (when installed)."""
    group_size: int = 8
    """G, responses sampled per prompt (paper: 16)."""
    max_new_tokens: int = 24
    """L_max, the longest response in tokens (paper: 20480)."""
    temperature: float = 1.0
    """Sampling temperature; training log-probs use the same temperature so ratios stay consistent."""
    top_p: float = 1.0
    """Nucleus sampling during training (paper: 1.0)."""
    top_k: int = 0
    """Top-k sampling; 0 = off."""
    gen_batch_size: int = 0
    """Prompts sampled per generation round; 0 = ``optim.train_batch_size`` (paper: 3x with dynamic sampling)."""
    dtype: str = "auto"
    """Weights the sampler uses: auto (the in-process engine samples with the trained float32 weights under
    ``model.dtype`` autocast; Ray workers hold a copy in ``model.dtype``), float32 or bfloat16 (the engine holds
    its own copy in that dtype, and each weight push converts: a GPU-like sampler/trainer mismatch on a CPU;
    see the ``mismatch/*`` metrics and ``algo.rollout_is``)."""
    lora_merge: bool = True
    """Under ``model.lora_rank`` > 0, the HF engine samples from merged weights: its own copy of each adapted
    Linear, W + (alpha/r) B A in the base's dtype, recomputed at each weight push (``dapo.lora.MergedSampler``),
    so decoding costs what the full model's does, for that copy's memory (2 bytes a weight in bfloat16).
    false: it samples through the unmerged adapters, no copy, two more matmuls per adapted Linear and token
    (generation ~2.5x the full model's on the small shapes). vLLM serves adapters with its own kernels either way."""
    use_engine_logprobs: bool = False
    """Take old log-probs from the rollout engine instead of recomputing them with the training model."""
    batch_size: int = 256
    """Most sequences the engine decodes at once."""
    gpu_memory_utilization: float | None = None
    """vLLM only: fraction of its GPU's memory vLLM may take (weights + KV cache). None: 0.5 where vLLM shares
    the GPU with training (the in-process engine beside a trainer here, or ``dist.colocate``), the rest left to
    training; 0.85 on a rollout worker's GPU of its own (vLLM's default is 0.9; the margin holds the CUDA
    context and a weight push's chunk)."""
    verify_weights: bool = True
    """After every weight push, compare fingerprints (float64 sums) of the tensors the engine now holds, computed
    on its side, with those of what the trainer pushed, in the dtype pushed; a stale, missing or corrupted tensor
    stops the run naming it. Skipped when the engine samples with the trained model itself (nothing travels)."""
    max_logp_diff: float = 1.0
    """Stop the run when ``mismatch/logp_abs_diff`` (mean |trainer log-prob - sampler log-prob| per token in the
    loss) passes this, before training on the step: a sampler serving other weights than the trainer's. bfloat16
    sampling against a float32 trainer measures ~0.01-0.05 and one step of staleness far less than 1 nat at
    RL learning rates, so 1.0 is a gap no rounding explains. 0 = off."""
    max_turns: int = 4
    """With an environment (``env.path`` or ``env.tools``): the most model turns per trajectory; a trajectory
    still going after them ends with finish_reason 'turns' (not overlong: the overlong filter keeps it)."""
    max_total_tokens: int = 0
    """With an environment: the most tokens of a trajectory, the model's and the observations' together (the
    prompt aside); 0 = the model's context (its config.json's max_position_embeddings) less the prompt, so
    observations the environment does not bound cannot outgrow the model. ``max_new_tokens`` bounds the model's
    own tokens either way (L_max, the soft overlong punishment and the overlong filter count them over all turns)."""


@dataclass(frozen=True)
class EnvConfig:
    """Multi-turn rollouts (``dapo.envs``): the model acts, an environment or its tools answer, up to
    ``rollout.max_turns`` turns. A trajectory's reward is the sum of the rewards the environment gave, or, when
    it gave none (tools never do), ``reward.fn`` (or the task's verifier) on the text of the model's last turn."""

    path: str = ""
    """Environment: path/to/file.py:Class or module:Class, called with no arguments for each trajectory, with
    ``reset(row)`` and ``step(model_text) -> dapo.envs.StepResult``; empty = none."""
    tools: str = ""
    """A Python file whose public functions are tools the model calls with <tool_call>{"name": ..., "arguments":
    {...}}</tool_call> or <tool>name(args)</tool>, or ``calculator`` (built in: mul(a, b), calc(expr)); a turn
    without a call is the final answer; empty = none."""
    workers: int = 2
    """Processes running tool calls (``tools``); a tool that hangs is stopped, one that crashes is replaced."""
    timeout_s: float = 5.0
    """Time limit of one tool call; past it the model is told the call timed out."""
    max_output_chars: int = 1000
    """A tool's output (what it printed, then what it returned) is cut to this many characters."""
    describe_tools: bool = True
    """With a chat template (``data.template`` ending in chat): the tools' JSON schemas (from their docstrings and
    signatures, ``dapo.envs.tools.tool_schemas``) are given to it as ``apply_chat_template(tools=...)``, which lists
    them where the template does (Qwen2.5, Hermes, Llama 3.1: the system prompt); False = the prompts say which
    tools exist."""
    memory_mb: int = 0
    """Address-space limit of each tool process, in MB; 0 = none."""
    step_timeout_s: float = 600.0
    """Time limit of one call of the environment's code (``env.path``: making it, ``reset``, ``step`` or
    ``step_many``); a call past it stops the run with an error naming it instead of hanging it. The calls run on a
    helper thread (so not where signal handlers can be set); 0 = no limit, on the rollout's own thread."""


@dataclass(frozen=True)
class AlgoConfig:
    eps_low: float = 0.2
    """Lower clip: ratio >= 1 - eps_low for negative advantages (paper: 0.2)."""
    eps_high: float = 0.28
    """Upper clip: ratio <= 1 + eps_high for positive advantages. Clip-Higher: 0.28; symmetric PPO: 0.2."""
    clip_c: float | None = None
    """Dual-clip constant (> 1) bounding the loss of negative-advantage tokens; None = off (ppo only)."""
    policy_loss: str = "ppo"
    """ppo (token-level clipped ratio: DAPO, GRPO), gspo (length-normalised sequence ratio, clipped with
    eps_low/eps_high of ~3e-4/4e-4; arXiv 2507.18071), cispo (clipped, detached importance weight times the
    log-prob: clipped tokens keep their gradient; arXiv 2506.13585)."""
    adv_estimator: str = "grpo"
    """grpo (R - group mean, over the group std with ``norm_adv_std``) or rloo (R - mean of the others,
    arXiv 2402.14740)."""
    loss_agg: str = "token-mean"
    """token-mean (DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO)."""
    norm_adv_std: bool = True
    """Divide advantages by the group std (GRPO, DAPO); False = Dr. GRPO's R - mean."""
    dynamic_sampling: bool = True
    """Drop groups whose ``filter_metric`` is all equal and sample more prompts to refill (DAPO §3.2)."""
    filter_metric: str = "acc"
    """What must vary within a kept group: acc (correctness) or reward (shaped score)."""
    max_gen_rounds: int = 8
    """Most generation rounds per step while refilling the batch (verl: max_num_gen_batches)."""
    on_gen_cap: str = "train"
    """When ``max_gen_rounds`` runs out: train (on the groups kept, and log it) or error."""
    refill: str = "batch"
    """How many prompts a refill round samples: batch (``rollout.gen_batch_size`` every round, as the paper and
    verl; the surplus is discarded) or adaptive (the first round ``gen_batch_size``, later rounds only
    what this step's keep rate says is missing, x1.25: fewer samples thrown away, same kept groups)."""
    carry_over: bool = False
    """Keep surplus mixed groups for the next step (with their behaviour log-probs) instead of discarding (paper)."""
    max_idle_steps: int = 5
    """Stop with an error after this many steps in a row that kept no group to train on (every group's rewards
    equal: a template, reward or length problem, not a learning one); 0 = never stop."""
    overlong_filter: bool = True
    """Mask truncated responses out of the loss (DAPO §3.4)."""
    soft_overlong: bool = True
    """Add the Soft Overlong Punishment (Eq. 13) to the reward."""
    overlong_cache_len: int = 4
    """L_cache, the length of the linear penalty window before L_max (paper: 4096 of 20480)."""
    overlong_factor: float = 1.0
    """Penalty at L_max (paper: 1.0)."""
    rollout_is: str = "none"
    """Correct the sampler/trainer mismatch: none; token (truncated importance weights min(pi_old / pi_sampler,
    ``rollout_is_cap``) on each token's loss, Yao et al. 2025); sequence (drop responses whose geometric-mean
    pi_old / pi_sampler lies outside [``rollout_mask_low``, ``rollout_mask_high``], verl's geometric rejection)."""
    rollout_is_cap: float = 2.0
    """The truncation of the token-level weights (verl's default, Yao et al.'s C = 2)."""
    rollout_mask_low: float = 0.999
    """Lower bound of the geometric-mean ratio a response keeps (verl's decoupled_geo_rs preset)."""
    rollout_mask_high: float = 1.001
    """Upper bound of the geometric-mean ratio a response keeps."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to the initial policy; DAPO uses none (0)."""
    kl_kind: str = "k3"
    """KL estimator when ``kl_coef`` > 0: k1, k2, k3."""


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 120
    """RL steps (one rollout batch each); the demo's 120 take about two minutes on 2 CPU cores."""
    max_samples: int = 0
    """Also stop once this many responses have been generated (an equal budget across presets); 0 = no limit."""
    train_batch_size: int = 16
    """Prompt groups per RL step (paper: 512)."""
    mini_batch_size: int = 4
    """Prompt groups per optimiser step; train_batch_size / mini_batch_size updates per RL step (paper: 16)."""
    micro_batch_size: int = 64
    """Responses per forward/backward; gradients accumulate over micro-batches (exact token-mean)."""
    micro_batch_tokens: int = -1
    """-1 = auto: packed (below) when responses may run to 256 tokens or more (``rollout.max_new_tokens``), with a
    budget of max(1024, data.max_prompt_len + rollout.max_new_tokens) tokens: on long-tailed lengths packing ran
    1.86x the padded layout's tokens/s (25M Qwen2, responses 16-1024, CPU sdpa, bench/RESULTS.md); shorter
    responses (the demo's 24) stay padded, where each prompt's prefill is shared by its G rows.
    0 = off (micro-batches of ``micro_batch_size`` padded rows). N > 0: micro-batches of at most N tokens
    (prompt + response), packed back to back into one row with position ids restarting at each sequence, so
    no padding is computed (a sequence longer than N goes alone); ``micro_batch_size`` is then unused. Same
    loss and gradient; pays with long-tailed lengths. Best with attn_implementation=flash_attention_2 (each
    sequence attends on its own); sdpa/eager build an N x N block-diagonal mask, so keep N moderate there.
    The shared-prompt prefill of the padded layout does not apply to packed rows (verl: use_dynamic_bsz +
    ppo_max_token_len_per_gpu)."""
    epochs: int = 1
    """Passes over each rollout batch."""
    skip_zero_adv: bool = True
    """No backward pass for responses whose advantage is exactly 0 (all-equal groups without dynamic
    sampling) when they are at least a quarter of a mini-batch: their gradient is zero, so the update is
    the same for less work; they still get a forward pass for the metrics. Off with a KL term."""
    lr: float = 1e-4
    """AdamW learning rate (paper: 1e-6 for 32B)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: 0.1)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimiser steps (paper: 20 rollout steps)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 = off."""
    max_bad_steps: int = 3
    """Stop after this many consecutive updates with a non-finite loss or gradient (each is skipped), or this
    many consecutive rollouts with NaN log-probs."""


@dataclass(frozen=True)
class LogConfig:
    out_dir: str = "runs"
    """Parent directory of run directories."""
    run_name: str = ""
    """Run directory name; empty = <preset>-<task>-<timestamp>."""
    tensorboard: str = "auto"
    """TensorBoard events: auto (written when tensorboard is installed, silently skipped otherwise), true
    (a message if it is not installed), false."""
    wandb: bool = False
    """Log to Weights & Biases (needs wandb installed and a login)."""
    wandb_project: str = "dapo"
    """W&B project."""
    progress: str = "auto"
    """auto (a live line on a terminal, plain lines otherwise), bar, plain, none."""
    samples_every: int = 10
    """Save a few decoded prompts, responses and rewards to samples.jsonl every N steps (0 = never)."""
    report: bool = True
    """Write plots and report.html into the run directory at the end (needs matplotlib)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the newest N checkpoints."""
    resume: str = ""
    """Run directory (or checkpoint directory) to continue from."""
    save_final: bool = True
    """Save a checkpoint after the last step."""


@dataclass(frozen=True)
class DistConfig:
    rollout_workers: int = 0
    """Ray rollout actors, each with its own engine and model copy; prompts are split across them
    (a prompt's G samples stay on one worker). 0 = an in-process engine."""
    trainer_ranks: int = 1
    """Data-parallel trainer ranks; > 1 runs them as Ray actors in a torch.distributed group (gloo on CPU,
    NCCL on GPU), each training on its share of every mini-batch with the global token-mean denominator."""
    ray_address: str = ""
    """Ray cluster address (``ray start --head`` prints it, or ``auto``); empty = start a local,
    loopback-only cluster when workers or ranks are asked for, and shut it down at the end."""
    fsdp: bool = False
    """Shard parameters, gradients and optimiser state across trainer ranks with FSDP2 (fully_shard)."""
    colocate: bool = False
    """Rollout worker i and trainer rank i share one device (half a GPU each, one placement group)."""
    rollout_on_ranks: bool = False
    """The trainer ranks sample too, each its slice of the prompts with an engine on the very model it
    trains (verl's hybrid engine): no rollout workers, no weight transfer, and no old log-prob recompute
    (the sampler's log-probs are the old policy's). HF engine, replicated ranks (not FSDP)."""
    timeout_s: float = 3600.0
    """Longest wait for any worker or rank call (generate, update, weight sync) before the run stops
    with an error naming who did not answer. A dead actor is reported at once, not after this."""
    worker_restarts: int = 0
    """Replace a dead rollout worker (with the latest weights) up to this many times in the run;
    0 = stop with an error naming it. Keeping the latest weights costs one model copy in the object store."""
    async_steps: int = 0
    """1 = one-step-off async rollout: while the trainer updates on step N's batch, the rollout workers
    already sample step N+1 with the weights that sampled step N (staleness 1; generation hides behind
    the update). Needs Ray rollout workers. The PPO ratio is then taken against the sampler's own
    log-probs (the policy that really sampled), or, with ``algo.rollout_is``, against the trainer's
    recompute with importance weights to the sampler (decoupled PPO). 0 = synchronous."""
    weight_chunk_mb: int = 512
    """Weights travel from the trainer to the rollout workers in chunks of about this many MB, one at a time
    in each process's memory."""


@dataclass(frozen=True)
class SFTConfig:
    """``dapo sft`` only: the supervised warm-up that makes a base model RL can start from."""

    response_key: str = "response"
    """Column of ``data.path`` holding the worked response to imitate (``dapo sft --data``)."""
    layers: int = 4
    """Tiny model made from scratch (no ``model.path``): decoder layers."""
    hidden: int = 128
    """Tiny model: hidden size."""
    heads: int = 4
    """Tiny model: attention heads."""
    ffn: int = 512
    """Tiny model: MLP width."""
    max_pos: int = 1024
    """Tiny model: its config's context in tokens (max_position_embeddings; at least twice the longest training
    sequence). Its rotary positions have no weights, so this costs nothing; it bounds multi-turn trajectories
    (``rollout.max_total_tokens`` = 0) and vLLM's max_model_len."""
    lr: float = 3e-3
    """AdamW learning rate (3e-3 for the tiny model; far lower, e.g. 1e-5, for a pretrained one)."""
    batch: int = 128
    """Examples per optimiser step."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up, in steps."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0 = off."""
    target_accuracy: float | None = 0.25
    """Stop at the first held-out measurement of sampled accuracy >= this (a base RL can climb from);
    None = stop on the held-out loss (``patience``). Needs a verifier and answers: a built-in task's, or
    ``reward.fn`` and ``data.answer_key`` for files; a file without answers stops on the loss."""
    min_steps: int = 150
    """No accuracy measurement before this step."""
    eval_every: int = 20
    """Measure held-out accuracy (and loss) every N steps from ``min_steps`` on."""
    patience: int = 3
    """Without an accuracy to stop on (``target_accuracy`` null, or rows with no answer): stop once the held-out
    loss has not improved for this many measurements; 0 = run ``max_steps``."""
    max_steps: int = 1000
    """Step cap."""
    n_probe: int = 256
    """Held-out prompts per measurement."""


@dataclass(frozen=True)
class Config:
    preset: str = "dapo"
    """Name of the preset this config started from (recorded, not re-applied)."""
    seed: int = 0
    """Run seed; every sampling seed is derived from (seed, step, prompt)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)

    @property
    def eval_seed(self) -> int:
        """The seed of the held-out prompts and their samples."""
        return self.seed if self.eval.seed is None else self.eval.seed


RENAMED = {
    "data.eval_path": "eval.path", "data.eval_size": "eval.size", "data.eval_seed": "eval.seed",
    "log.eval_every": "eval.every", "log.eval_k": "eval.k", "rollout.eval_temperature": "eval.temperature",
    "rollout.eval_top_p": "eval.top_p", "data.reward": "reward.fn", "data.reward_workers": "reward.workers",
    "data.reward_timeout_s": "reward.timeout_s", "data.reward_memory_mb": "reward.memory_mb",
    "optim.gen_batch_size": "rollout.gen_batch_size",
}
"""Keys that moved (accepted for one release with a message naming the new key)."""


# --------------------------------------------------------------------------------------------------
# presets: the paper's Table 1 rows are progressive; each adds one technique to the row above

_GRPO = {
    "algo.eps_low": 0.2,
    "algo.eps_high": 0.2,
    "algo.loss_agg": "seq-mean-token-mean",
    "algo.dynamic_sampling": False,
    "algo.overlong_filter": False,
    "algo.soft_overlong": False,
}
ABLATION_ROWS = ("grpo", "+overlong_filter", "+clip_higher", "+soft_overlong", "+token_loss", "dapo")
_ROW_ADDS = {
    "+overlong_filter": {"algo.overlong_filter": True},
    "+clip_higher": {"algo.eps_high": 0.28},
    "+soft_overlong": {"algo.soft_overlong": True},
    "+token_loss": {"algo.loss_agg": "token-mean"},
    "dapo": {"algo.dynamic_sampling": True},
}


def _build_presets() -> dict[str, dict[str, Any]]:
    presets = {"grpo": dict(_GRPO)}
    acc = dict(_GRPO)
    for row in ABLATION_ROWS[1:]:
        acc = {**acc, **_ROW_ADDS[row]}
        presets[row] = dict(acc)
    return presets


PRESETS: dict[str, dict[str, Any]] = _build_presets()
PRESETS.update({
    # the loss family researchers ablate against DAPO (issue: loss variants), each on DAPO's sampling
    "gspo": {**PRESETS["dapo"], "algo.policy_loss": "gspo", "algo.eps_low": 3e-4, "algo.eps_high": 4e-4,
             "algo.loss_agg": "seq-mean-token-mean"},
    "cispo": {**PRESETS["dapo"], "algo.policy_loss": "cispo", "algo.eps_low": 1.0, "algo.eps_high": 0.28},
    # the estimator variants on naive GRPO's sampling
    "drgrpo": {**PRESETS["grpo"], "algo.norm_adv_std": False, "algo.loss_agg": "seq-mean-token-sum-norm"},
    "rloo": {**PRESETS["grpo"], "algo.adv_estimator": "rloo", "algo.norm_adv_std": False},
})
AUTO_PACK_FROM = 256
"""``optim.micro_batch_tokens=-1`` packs when ``rollout.max_new_tokens`` is at least this."""


def token_budget(cfg: "Config") -> int:
    """``optim.micro_batch_tokens`` with -1 (auto) resolved: 0 (padded) for short responses, else a packed budget
    of max(1024, the longest sequence a rollout can hold). See the field's docstring for the measurement."""
    tokens, r = cfg.optim.micro_batch_tokens, cfg.rollout
    if tokens >= 0:
        return tokens
    if r.max_new_tokens < AUTO_PACK_FROM:
        return 0
    return max(1024, cfg.data.max_prompt_len + r.max_new_tokens)


PRESET_DOCS = {
    "grpo": "naive GRPO: symmetric clip 0.2, seq-mean-token-mean, no dynamic sampling, no overlong shaping",
    "+overlong_filter": "grpo + overlong filtering (Table 1 row 2)",
    "+clip_higher": "row 2 + Clip-Higher eps_high=0.28 (row 3)",
    "+soft_overlong": "row 3 + soft overlong punishment (row 4)",
    "+token_loss": "row 4 + token-level loss (row 5)",
    "dapo": "full DAPO: row 5 + dynamic sampling (paper §4.1)",
    "gspo": "DAPO with GSPO's sequence-level ratio, clip 3e-4 / 4e-4, seq-mean-token-mean (arXiv 2507.18071)",
    "cispo": "DAPO with CISPO's clipped, detached IS weight x log-prob, upper clip 0.28 only (arXiv 2506.13585)",
    "drgrpo": "GRPO with Dr. GRPO's R - mean advantages and a constant length normaliser (arXiv 2503.20783)",
    "rloo": "GRPO with leave-one-out baselines, no std normalisation (arXiv 2402.14740)",
}
