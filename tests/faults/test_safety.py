"""Nothing a downloaded model, a copied checkpoint or a config can carry runs code unless the user
asks: weights load from safetensors only, remote code is off, and the trainer state loads with
``torch.load(weights_only=True)``. Each attack here would create a marker file if it ran."""
import json
import os
import shutil

import pytest
import torch

import faultkit as fk
from dapo.cli import main as cli_main
from dapo.config import load_config
from dapo.trainer.checkpoint import MANIFEST, _sha256
from dapo.model import SetupError, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Pickles to a call of os.system: what a malicious .bin / .pt file carries."""

    def __init__(self, marker):
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return os.system, (self.cmd,)


def _pickle_model_dir(tiny_model_dir, dst, payload=None):
    """The tiny model as pytorch_model.bin (a pickle), optionally with a payload inside."""
    shutil.copytree(tiny_model_dir, dst)
    from safetensors.torch import load_file

    state = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    obj = dict(state, evil=payload) if payload is not None else state
    torch.save(obj, dst / "pytorch_model.bin")
    return dst


def test_pickle_weights_are_refused_without_the_explicit_flag(tiny_model_dir, tmp_path, capsys):
    model = _pickle_model_dir(tiny_model_dir, tmp_path / "m")
    rc = cli_main(["train", "--model", str(model), f"log.out_dir={tmp_path}", "log.run_name=r", *fk.FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "model.allow_unsafe_weights=true" in err
    cfg = load_config(overrides=["model.allow_unsafe_weights=true"])
    m = load_model(cfg.model, str(model), torch.device("cpu"))  # with the flag, it loads
    assert sum(p.numel() for p in m.parameters()) > 0


def test_a_pickle_payload_does_not_run_even_with_the_flag(tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    model = _pickle_model_dir(tiny_model_dir, tmp_path / "m", _Payload(marker))
    cfg = load_config(overrides=["model.allow_unsafe_weights=true"])
    with pytest.raises(SetupError, match="cannot load model.path"):
        load_model(cfg.model, str(model), torch.device("cpu"))
    assert not marker.exists()


def test_remote_code_in_a_model_directory_is_not_run(tiny_model_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                   "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
                                   "class EvilConfig(Qwen2Config):\n    model_type = 'evil'\n"
                                   "class EvilModel(Qwen2ForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(cfg))
    rc = cli_main(["train", "--model", str(model), f"log.out_dir={tmp_path}", "log.run_name=r", *fk.FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "trust_remote_code" in err and not marker.exists()


def test_a_trainer_state_with_a_payload_is_refused_on_resume(tiny_model_dir, tmp_path, capsys):
    assert cli_main(["train", "--model", str(tiny_model_dir), f"log.out_dir={tmp_path}", "log.run_name=r",
                     "optim.steps=1", *fk.FAST]) == 0
    ckpt, marker = tmp_path / "r" / "step_1", tmp_path / "pwned"
    st = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    st["rng"]["evil"] = _Payload(marker)
    torch.save(st, ckpt / "trainer_state.pt")
    man = json.loads((ckpt / MANIFEST).read_text())  # re-sealed: the manifest check alone would not catch it
    man["files"]["trainer_state.pt"] = {"bytes": (ckpt / "trainer_state.pt").stat().st_size,
                                        "sha256": _sha256(ckpt / "trainer_state.pt")}
    (ckpt / MANIFEST).write_text(json.dumps(man))
    capsys.readouterr()
    rc = cli_main(["train", "--resume", str(tmp_path / "r"), "optim.steps=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "trainer_state.pt: cannot load the trainer state (UnpicklingError" in err
    assert not marker.exists()
