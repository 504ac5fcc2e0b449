"""One error base class: every error tuneforge raises for people derives from TuneforgeError, and `main` turns
any of them into its message on stderr and the class's exit code, with no traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import tuneforge
from tuneforge.cli import main
from tuneforge.errors import InputError, TuneforgeError

# exceptions that are not errors for the person running tuneforge: an HTTP answer (the server turns it into an
# OpenAI error body), a row check the data stage turns into a counted skip or a DataFormatError, and the
# "already complete" outcome of `train`, which may exit 0
NOT_FOR_PEOPLE = {
    "tuneforge.serve.protocol.APIError",
    "tuneforge.data.row_error.RowError",
    "tuneforge.cli.train_commands.RunComplete",
}


def error_classes() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(tuneforge.__path__, "tuneforge."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra (fastapi, deepspeed) missing: its module is not checked
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_error_class_derives_from_the_one_base():
    classes = error_classes()
    assert len(classes) >= 20
    assert sorted(n for n, c in classes.items() if not issubclass(c, TuneforgeError) and n not in NOT_FOR_PEOPLE) == []


@pytest.mark.parametrize(("cls", "code"), [(InputError, 2), (TuneforgeError, 1)])
def test_main_prints_the_message_and_exits_with_the_class_code(cls, code, monkeypatch, capsys):
    import tuneforge.cli.data_commands as commands

    def fail(args):
        raise cls("data/train.jsonl:7: the field 'output' is missing; add it or set data.skip_invalid=true")

    monkeypatch.setattr(commands, "cmd_reference", fail)
    monkeypatch.setattr("tuneforge.cli.cmd_reference", fail)
    assert main(["reference"]) == code
    assert capsys.readouterr().err == (
        "error: data/train.jsonl:7: the field 'output' is missing; add it or set data.skip_invalid=true\n"
    )
