"""dapo: DAPO (Decoupled Clip and Dynamic sAmpling Policy Optimization) for LLM reasoning RL.

    from dapo import Config, train
    result = train(Config())          # the built-in demo: a tiny model learns multi-digit addition

The packages, in the order data flows: ``data`` (prompt files, templates, built-in tasks) and ``problems``
(prompts + verifier as one config says) -> ``rollout`` (engines: token ids in, completions out) -> ``rewards``
(verifiers) -> ``algo`` (the maths: pure tensor functions) -> ``trainer`` (the loop) -> ``dist`` (Ray).
Beside them: ``config`` (every option of every command), ``model`` (loading, dtypes, optimiser),
``lora``, ``eval`` (the one evaluator), ``warmup`` (``dapo sft``), ``items``/``ragged`` (the shared data
types), ``report``, ``ablate``, ``cli``.
"""
from dapo.config import Config, load_config

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "train", "RunResult"]


def __getattr__(name):  # the trainer pulls in transformers; keep `import dapo` light
    if name in ("train", "RunResult"):
        from dapo.trainer import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'dapo' has no attribute {name!r}")
