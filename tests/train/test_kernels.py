"""train.liger_kernels: a clear stop where the kernels cannot run (CUDA-only Triton kernels; no GPU in CI)."""

import importlib.util

import pytest
import yaml

from tuneforge.cli import main
from tuneforge.config.load import ConfigError
from tuneforge.model.kernels import check_liger


def test_liger_kernels_on_a_cpu_stop_the_run_before_loading_with_the_fix(tiny_config_dict, tmp_path, capsys):
    tiny_config_dict["train"]["liger_kernels"] = True
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict))
    assert main(["train", str(path)]) != 0
    err = capsys.readouterr().err
    assert "train.liger_kernels: Liger kernels are Triton kernels for CUDA GPUs and this run is on cpu" in err
    assert "set train.liger_kernels=false" in err
    assert not (tmp_path / "run" / "base").exists()  # stopped before the new model was built and saved


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_kernels_without_the_package_name_the_extra():
    with pytest.raises(ConfigError, match=r"needs the liger-kernel package .*pip install 'tuneforge\[liger\]'"):
        check_liger("cuda")
