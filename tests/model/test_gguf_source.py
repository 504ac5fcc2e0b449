"""model.name_or_path as a GGUF file: checked, converted once into a cached safetensors base (exactly the same
logits and tokenizer as the model the GGUF was written from), bad files refused with the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'tuneforge[gguf]'")

from tuneforge.cli import main
from tuneforge.export.gguf_file import export_gguf
from tuneforge.gguf_path import resolve_gguf_path
from tuneforge.model.gguf_source import DONE_FILE, GGUFError, converted_base, inspect_gguf

from ..export.test_gguf import tiny_dir


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny Llama's HF directory, the f32 GGUF written from it)."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    model_dir = tiny_dir(root / "hf")
    out = root / "tiny-llama.gguf"
    export_gguf(model_dir, out, "f32", log=lambda _: None)
    return model_dir, out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_conversion_gives_the_same_model_and_tokenizer_and_is_cached(tiny_gguf, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, path = tiny_gguf
    logs: list[str] = []
    out = converted_base(path, torch.float32, logs.append)
    assert out.parent == cache / "gguf" and out.name.startswith("tiny-llama-") and out.name.endswith("-float32")
    assert "converting tiny-llama.gguf (llama, 21 tensors of type F32" in logs[0]
    record = json.loads((out / DONE_FILE).read_text())
    assert record["architecture"] == "llama" and record["tensor_types"] == ["F32"] and record["tensors"] == 21
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    want = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
    got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.equal(want, got)
    text = "Reverse the order of these words.\n\nrocket candle island"
    assert (
        AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(model_dir)(text).input_ids
    )
    # the second time: found by the file's hash, nothing converted, nothing else in the cache
    assert converted_base(path, torch.float32, logs.append) == out and "converted before" in logs[-1]
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [out.name]
    assert inspect_gguf(path).tensors == 21  # answered from the cache record


def _bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:4000])
    other = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(other), "rwkv6")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"text": text, "cut": cut, "header": header_only, "rwkv": other, "missing": tmp_path / "absent.gguf"}


@pytest.mark.parametrize(
    "kind,message",
    [
        ("text", "is not a GGUF file (it starts with b'this'"),
        ("cut", "is truncated or corrupt"),
        ("header", "is truncated or corrupt"),
        ("rwkv", "architecture 'rwkv6' cannot be read by transformers' GGUF support"),
        ("missing", "no such file"),
    ],
)
def test_bad_gguf_files_are_refused_with_the_file_and_the_fix(kind, message, tiny_gguf, cache, tmp_path):
    bad = _bad_files(tmp_path, tiny_gguf[1])[kind]
    with pytest.raises(GGUFError) as e:
        converted_base(bad, torch.float32, lambda _: None)
    assert message in str(e.value) and bad.name in str(e.value)
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())  # nothing half-written


def test_train_on_a_corrupt_gguf_stops_before_writing_the_run(tiny_gguf, cache, tmp_path, tiny_config_dict, capsys):
    bad = _bad_files(tmp_path, tiny_gguf[1])["cut"]
    cfg = {**tiny_config_dict, "model": {"name_or_path": str(bad)}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {bad} is truncated" in err and "download or copy it again" in err.lower()
    assert not Path(cfg["output"]["dir"]).exists()


def test_a_lora_run_on_a_gguf_links_its_base_into_the_run_and_exports(tiny_gguf, cache, tmp_path, tiny_config_dict):
    model_dir, path = tiny_gguf
    cfg = {**tiny_config_dict, "model": {"name_or_path": str(path)}, "adapter": {"type": "lora", "r": 4, "alpha": 8}}
    cfg["train"]["max_steps"] = 2
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(cfg_path)]) == 0
    run = Path(cfg["output"]["dir"])
    converted = next((cache / "gguf").iterdir())
    base = run / "base"
    assert json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    # the run's base/ is the cached conversion, hard-linked (no second copy of the weights on disk)
    assert (base / "model.safetensors").stat().st_ino == (converted / "model.safetensors").stat().st_ino
    assert main(["export", str(run), "--gguf", "--gguf-type", "f32"]) == 0
    from transformers import AutoModelForCausalLM

    exported = run / "export"
    back = next(exported.glob("*.gguf"))
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    merged = AutoModelForCausalLM.from_pretrained(exported)(ids).logits
    read_back = AutoModelForCausalLM.from_pretrained(exported, gguf_file=back.name)(ids).logits
    assert torch.allclose(merged, read_back, atol=1e-5)


def test_a_gguf_inside_an_installed_package_is_found_by_the_package_name(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "my_models_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_gguf_path("my_models_pkg/m.gguf") == pkg / "m.gguf"
    assert resolve_gguf_path("my_models_pkg/other.gguf") == Path("my_models_pkg/other.gguf")
    assert resolve_gguf_path("no_such_pkg_xyz/m.gguf") == Path("no_such_pkg_xyz/m.gguf")
