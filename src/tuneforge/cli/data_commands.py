"""validate, reference, prepare, data preview."""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.cli.console import _load
from tuneforge.config.load import write_resolved_config
from tuneforge.config.packages import missing_packages


# ---------------------------------------------------------------------------- validate / reference
def cmd_validate(args) -> int:
    cfg = _load(args)
    kind = cfg.adapter.type
    src = cfg.model.name_or_path or f"new {cfg.model.init.architecture}"
    print(f"{args.config}: valid ({kind} fine-tuning of {src}, lr {cfg.train.lr:g}, run dir {cfg.output.dir})")
    missing = missing_packages(cfg)
    if missing:  # a finding about this machine, not about the config: `train` refuses to start without them
        print("missing on this machine (train will not start until they are installed):\n  " + "\n  ".join(missing))
    return 0


def cmd_reference(args) -> int:
    from pydantic import BaseModel

    from tuneforge.config.schema import RunConfig

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = next(
                (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
                None,
            )
            if sub is not None:
                print(f"\n{prefix}{name}:  {field.description or ''}")
                walk(sub, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            print(f"  {prefix}{name} = {default}\n      {field.description or ''}")

    walk(RunConfig, "")
    return 0


# ---------------------------------------------------------------------------- prepare
def cmd_prepare(args) -> int:
    from tuneforge.data.prepare import prepare

    cfg = _load(args)
    run_dir = Path(cfg.output.dir)
    write_resolved_config(cfg, run_dir)
    data = prepare(cfg, run_dir, force=args.force)
    if data.reused:
        from tuneforge.data.prepare import summary

        print(summary(data.report))
    print(f"prepared data: {run_dir / 'data'} (load with datasets.load_from_disk('{run_dir / 'data' / 'train'}'))")
    return 0


def cmd_data_preview(args) -> int:
    from tuneforge.data.prepare import prepare
    from tuneforge.data.preview import row_preview

    cfg = _load(args)
    run_dir = Path(cfg.output.dir)
    write_resolved_config(cfg, run_dir)
    data = prepare(cfg, run_dir, log=lambda s: print(s, file=sys.stderr))
    color = sys.stdout.isatty() if args.color == "auto" else args.color == "always"
    legend = "trained tokens in green" if color else "trained tokens between [[ and ]]"
    print(f"{min(args.rows, len(data.train))} of {len(data.train)} training rows ({legend}):")
    rows = data.train.select(range(min(args.rows, len(data.train))))
    for k, row in enumerate(rows):
        print(row_preview(data.tokenizer, row, k, color))
    return 0
