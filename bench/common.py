"""Shared pieces of the benchmarks: models saved in Hugging Face format, the machine, stats, tables, memory.

Not part of the test suite. Every script prints a table and, as its last line, one JSON object.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(os.environ.get("DAPO_SRC") or Path(__file__).resolve().parents[1])
"""The dapo checkout the benchmarks import: this one, or ``$DAPO_SRC`` (an older one, for before/after)."""
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------------------------------
# models

MODEL_SHAPES: dict[str, dict[str, int]] = {
    # the demo's base model shape (dapo.config.SFTConfig): 1.06M parameters
    "tiny": dict(layers=4, hidden=128, heads=4, ffn=512, max_pos=128),
    # the same shape, random init (no warm-up needed: for quick checks of the scripts themselves)
    "tiny-rand": dict(layers=4, hidden=128, heads=4, ffn=512, max_pos=128),
    # ~25M parameters, random init: same character vocabulary, a Qwen2 a few hundred times wider
    "25m": dict(layers=6, hidden=512, heads=8, ffn=2048, max_pos=256),
}


def build_char_model(out_dir: str | Path, layers: int, hidden: int, heads: int, ffn: int, max_pos: int,
                     seed: int = 0, vocab_size: int | None = None) -> Path:
    """A randomly initialised Qwen2 causal LM with dapo's character tokenizer, saved (safetensors) to ``out_dir``.

    ``vocab_size`` larger than the tokenizer's pads the embedding (to time a big LM head); the extra
    rows are never produced by the tokenizer but are sampled like any other token.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dapo.data.charvocab import make_char_tokenizer

    tok = make_char_tokenizer()
    cfg = Qwen2Config(
        vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_pos,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def demo_model_dir() -> Path:
    """The built-in demo's base model (SFT warm-up on addition, cached in ~/.cache/dapo; built if missing)."""
    from dapo.warmup import prepare_base_model

    return Path(prepare_base_model("addition", log=lambda s: print(s, file=sys.stderr)))


def model_dir(kind: str, tmp: str | Path) -> Path:
    """'tiny' -> the demo's trained base model; any other MODEL_SHAPES key -> a random-init model in ``tmp``."""
    if kind == "tiny":
        return demo_model_dir()
    return build_char_model(Path(tmp) / kind, **MODEL_SHAPES[kind])


def n_params(path: str | Path) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(xs: Sequence[int]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


# --------------------------------------------------------------------------------------------------
# the machine


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    for mod in ("transformers", "trl", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------------
# memory: the kernel's peak-RSS counter, reset on demand (tracemalloc does not see torch's allocations)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size since the last ``reset_peak_rss`` (the process's lifetime peak otherwise)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.delta_mb``: peak RSS during the block minus RSS before it."""

    def __enter__(self):
        import gc

        gc.collect()
        self.ok = reset_peak_rss()
        self.before = rss_mb()
        return self

    def __exit__(self, *exc):
        self.peak = peak_rss_mb()
        self.delta_mb = self.peak - self.before
        return False


# --------------------------------------------------------------------------------------------------
# stats and output


def summary(xs: Sequence[float]) -> dict[str, float]:
    xs = list(xs)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return str(x)


def table(rows: list[dict[str, Any]], cols: Sequence[str] | None = None, nd: int = 3) -> str:
    """A GitHub-markdown table (paste it into RESULTS.md as is)."""
    if not rows:
        return "(no rows)"
    cols = list(cols or rows[0].keys())
    cells = [[fmt(r.get(c, ""), nd) for c in cols] for r in rows]
    w = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.rjust(w[i]) for i, x in enumerate(xs)) + " |"  # noqa: E731
    return "\n".join([line(cols), "| " + " | ".join("-" * (n - 1) + ":" for n in w) + " |", *map(line, cells)])


def emit_json(obj: dict[str, Any]) -> None:
    """The script's one JSON line, last on stdout (strict JSON: NaN becomes null)."""
    def clean(o: Any) -> Any:
        if isinstance(o, float):
            return None if o != o or o in (float("inf"), float("-inf")) else o
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    print(json.dumps(clean(obj), default=str, allow_nan=False), flush=True)


def set_threads(n: int | None) -> int:
    import torch

    n = n or min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    torch.set_num_threads(n)
    return n
