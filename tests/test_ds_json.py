"""One way to give DeepSpeed its JSON (runtime/engine.py): the flag or its config-file twin, and
no value the trainers set overridden silently by the JSON (or the JSON by them)."""
import json

import pytest

from beit3.model.config import ConfigError
from beit3.runtime import engine as E
from beit3.runtime.optim import OptimConfig

REPO_JSONS = sorted(p.name for p in E.DS_CONFIG_DIR.glob("*.json"))


def test_flag_or_field_and_both_only_when_equal():
    assert E.resolve_ds_config("zero3_bf16.json", None, default="x.json") == "zero3_bf16.json"
    assert E.resolve_ds_config(None, "zero1_bf16.json", default="x.json") == "zero1_bf16.json"
    assert E.resolve_ds_config("a.json", "a.json") == "a.json"
    assert E.resolve_ds_config(None, "", default="x.json") == "x.json"
    with pytest.raises(ConfigError, match=r"--deepspeed_config='a.json' and run.deepspeed_config='b.json'"):
        E.resolve_ds_config("a.json", "b.json")
    with pytest.raises(ConfigError, match="run.deepspeed_config"):
        E.resolve_ds_config(None, None)


def test_json_values_the_code_sets_must_agree():
    optim = OptimConfig()
    settings = E.code_settings(optim, "/runs/x/tensorboard")
    E.check_code_settings({}, settings)  # nothing set: nothing to disagree with
    same = {"optimizer": {"type": "adamw", "params": {"lr": optim.lr, "betas": [optim.beta1, optim.beta2],
                                                      "torch_adam": False}},
            "gradient_clipping": optim.grad_clip, "tensorboard": {"enabled": True}}
    E.check_code_settings(same, settings)  # equal values pass (the type case-insensitively)
    with pytest.raises(ConfigError) as e:
        E.check_code_settings({"optimizer": {"type": "Lamb", "params": {"lr": 0.5}}, "gradient_clipping": 1.0,
                               "tensorboard": {"output_path": "/elsewhere"}}, settings)
    msg = str(e.value)
    for both in ("optimizer.type='Lamb' but optim (AdamW)", "optimizer.params.lr=0.5 but optim.lr=0.001",
                 "gradient_clipping=1.0 but optim.grad_clip=3.0", "tensorboard.output_path='/elsewhere' but run.output_dir"):
        assert both in msg, msg
    E.check_code_settings({"tensorboard": {"enabled": False}}, E.code_settings(optim, None))  # tensorboard off: ours


@pytest.mark.parametrize("name", REPO_JSONS)
def test_shipped_jsons_leave_the_code_settings_to_the_trainers(name):
    E.check_code_settings(E.load_ds_config(name), E.code_settings(OptimConfig(), "/tb"))


def test_no_two_shipped_jsons_are_twins():
    texts = {}
    for name in REPO_JSONS:
        key = json.dumps(E.load_ds_config(name), sort_keys=True)
        assert key not in texts, f"{name} and {texts.get(key)} are the same JSON"
        texts[key] = name


def test_pretrain_validation_names_the_clash_and_the_flag_conflict(demo_data, tiny_tokenizer, tmp_path):
    from beit3.pretrain import train
    from beit3.testing.jobs import TINY_YAML, overrides

    bad = tmp_path / "clip.json"
    bad.write_text(json.dumps({**E.load_ds_config("zero3_bf16.json"), "gradient_clipping": 0.5}))
    args = ["--config", str(TINY_YAML), "--validate-only", *overrides(demo_data, tiny_tokenizer, tmp_path)]
    with pytest.raises(ConfigError, match="gradient_clipping=0.5 but optim.grad_clip"):
        train.main(["--deepspeed_config", str(bad), *args])
    assert train.main(["--deepspeed_config", "zero3_bf16.json", *args, "run.deepspeed_config=zero3_bf16.json"]) == {}
    with pytest.raises(ConfigError, match="name different JSONs"):
        train.main(["--deepspeed_config", "zero3_bf16.json", *args, "run.deepspeed_config=zero1_bf16.json"])
