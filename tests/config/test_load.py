import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main
from tuneforge.config.load import ConfigError, dump_config, load_config, write_resolved_config
from tuneforge.config.schema import RunConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "configs" / "examples").glob("*.yaml"))

MINIMAL = """\
model:
  name_or_path: Qwen/Qwen2.5-0.5B-Instruct
data:
  train:
    - path: data/train.json
train:
  epochs: 2
"""


def write(tmp_path, text, name="config.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_minimal_lora_config_gets_documented_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.adapter.type == "lora" and cfg.adapter.r == 16 and cfg.adapter.target_modules == "all-linear"
    assert cfg.train.lr == 2e-4
    assert cfg.train.precision == "auto"
    assert cfg.model.trust_remote_code is False


def test_full_finetune_default_lr(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["adapter.type=full"])
    assert cfg.train.lr == 2e-5


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    p = write(tmp_path, MINIMAL + "  micro_batch_sise: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:8: unknown key 'train.micro_batch_sise'" in msg
    assert "did you mean 'train.micro_batch_size'?" in msg


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian'. did you mean 'train'\?"):
        load_config(write(tmp_path, MINIMAL + "trian: {}\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL), ["train.lr=fast"])
    msg = str(e.value)
    assert "command line override 'train.lr=fast': train.lr:" in msg
    assert "got 'fast'" in msg


def test_literal_choice_lists_valid_values(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"adapter.type: Input should be 'lora', 'dora', 'qlora' or 'full' "
        r"\(got 'qlorra'\)",
    ):
        load_config(write(tmp_path, MINIMAL), ["adapter.type=qlorra"])


def test_bad_combination_model_source(tmp_path):
    text = MINIMAL.replace("model:\n", "model:\n  init: {hidden_size: 64}\n")
    with pytest.raises(ConfigError, match="set exactly one of model.name_or_path .* or model.init"):
        load_config(write(tmp_path, text))


def test_bad_combination_generation_eval_without_held_out_rows(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.generate_rows=5 needs held-out rows"):
        load_config(write(tmp_path, MINIMAL), ["eval.generate_rows=5"])


def test_lr_outside_usual_range_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"train.lr=0.05 is outside the usual range 0.0001-0.002 for lora"):
        load_config(write(tmp_path, MINIMAL), ["train.lr=0.05"])


def test_overrides_parse_yaml_values_and_list_indices(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        ["train.lr=1e-4", "data.train.0.max_rows=5", "adapter.target_modules=[q_proj, v_proj]"],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.train[0].max_rows == 5
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]


def test_base_include_is_merged_and_overridden(tmp_path):
    write(tmp_path, MINIMAL, "base.yaml")
    cfg = load_config(write(tmp_path, "base: base.yaml\ntrain:\n  micro_batch_size: 2\n"))
    assert cfg.train.micro_batch_size == 2 and cfg.train.epochs == 2
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    out = write_resolved_config(cfg, tmp_path / "run")
    assert RunConfig.model_validate(yaml.safe_load(out.read_text())) == cfg
    assert "lr: 0.0002" in dump_config(cfg)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_validates(path):
    cfg = load_config(path)
    assert cfg.output.dir.startswith("runs/")


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert "quickstart.yaml" in names and len(names) >= 4


def test_validate_command_exit_codes(tmp_path, capsys):
    good = write(tmp_path, MINIMAL)
    assert main(["validate", str(good)]) == 0
    assert "valid (lora fine-tuning of Qwen/Qwen2.5-0.5B-Instruct, lr 0.0002" in capsys.readouterr().out
    bad = write(tmp_path, MINIMAL + "  gradient_acum: 4\n", "bad.yaml")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.gradient_acum'. did you mean 'train.grad_accum'?" in err
    assert err.startswith("error: invalid config:")


def test_validate_entry_point_exits_nonzero_in_a_real_process(tmp_path):
    bad = write(tmp_path, MINIMAL + "  warmup_ratio: lots\n")
    proc = subprocess.run([sys.executable, "-m", "tuneforge.cli", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.warmup_ratio: Input should be a valid number" in proc.stderr
    assert "got 'lots'" in proc.stderr


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_reference_documents_every_field(capsys):
    assert main(["reference"]) == 0
    out = capsys.readouterr().out
    for section in RunConfig.model_fields:
        assert f"\n{section}:" in out
    assert "  train.lr = None\n      Peak learning rate; default 2e-4 for LoRA/DoRA, 2e-5 for full." in out
    assert "  data.train.path = None" in out


def test_every_config_field_has_a_description():
    from pydantic import BaseModel

    missing = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            ann = field.annotation
            for sub in (ann, *getattr(ann, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    walk(sub, f"{prefix}{name}.")

    walk(RunConfig, "")
    assert missing == []


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    text = MINIMAL.replace("  epochs: 2\n", "  epochs: 2\n  lr: 1e-4\n  epochs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    path = (tmp_path / "config.yaml").resolve()
    assert str(e.value) == (
        f"{path}:9: key 'train.epochs' is given twice (first on line 7); YAML would "
        "silently keep only the last one. Delete one of them."
    )
    # the same name in different sections is fine
    load_config(write(tmp_path, MINIMAL + "eval:\n  max_new_tokens: 8\n", "ok.yaml"))
