"""Command line: ``gho2kvm`` and ``python -m pipeline`` (the same CLI)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.core import log, receipts
from pipeline.core.choices import Scheduler, values
from pipeline.core.config import ConfigError, load_config
from pipeline.core.errors import Gho2KvmError, plain_error
from pipeline.core.safeio import escape
from pipeline.tools.run import Terminated, install_signal_handlers

#: command-line flags that are settings (:mod:`pipeline.core.settings`): option dest → settings field
SETTING_FLAGS = ("force_tcg", "scheduler", "scheduler_url")


def _load(args: argparse.Namespace):
    """The config with its settings built once: YAML, then environment, then the flags given; VM
    sources (``.vmx``) resolved to their disks and settings; then the one path rule (docs/safety.md)
    for every image, before anything runs."""
    from pipeline.core import paths
    from pipeline.steps.sources import check_paths
    from pipeline.steps.vm_source import resolve_config

    paths.allow_overwrite(bool(getattr(args, "force", False)))
    cfg = resolve_config(load_config(args.config, flags={k: getattr(args, k, None) for k in SETTING_FLAGS}))
    check_paths(cfg)
    return cfg


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"{cfg.path}: OK, {len(cfg.images)} image(s)")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from pipeline.app.runner import migrate

    cfg = _load(args)
    return migrate(cfg, image=args.image or None, workers=args.workers)


def cmd_inspect(args: argparse.Namespace) -> int:
    import luigi

    from pipeline.app.runner import record_failures, run_log_path
    from pipeline.tasks import Inspect
    from pipeline.tasks.base import use_config

    cfg = _load(args)
    img = cfg.image(args.image)
    use_config(cfg)
    record_failures()
    # stderr carries the one error line; the events (and any traceback) go to the JSON log file
    log.configure(log_file=run_log_path(cfg).with_name(f"inspect-{img.id}-{os.getpid()}.jsonl"))
    log.console_off()
    log.luigi_defers_to_us()
    task = Inspect(config_path=str(cfg.path.absolute()), image_id=args.image)
    res = luigi.build([task], local_scheduler=True, workers=1, detailed_summary=True)
    r = task.receipt()
    if not task.complete() or r is None:
        record = receipts.read(task.error_path) or {}
        err = record.get("error")
        print(escape(err, 2000) if err else f"inspect failed ({res.status.name})", file=sys.stderr)
        return 2 if record.get("refused") else 1
    print(json.dumps(r["result"], indent=2))
    for w in r.get("warnings") or []:  # e.g. a damaged or dirty hive: one line each
        print(escape(w, 2000), file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.app.plan import plan_text

    cfg = _load(args)
    text = plan_text(cfg, only=args.image or None)
    print(text)
    # a refusal found from the inspect facts: the migration would stop at registry-merge (exit 2, as
    # every refusal)
    return 2 if any(line.startswith("REFUSED: ") for line in text.splitlines()) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.app.report import write_report

    cfg = _load(args)
    md, html = write_report(cfg)
    print(md)
    print(html)
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from pipeline.app.scan import run

    return run(args.folders, output=args.output, update=args.update, max_depth=args.max_depth,
               max_files=args.max_files)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gho2kvm", description="Ghost/VMDK Windows images → libvirt domains")
    p.add_argument("--version", action="version", version=f"gho2kvm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser, image_required: bool = False) -> None:
        sp.add_argument("--config", "-c", required=True, type=Path, help="YAML config file")
        sp.add_argument("--image", "-i", required=image_required, default="", help="only this image id")
        sp.add_argument("--force", action="store_true",
                        help="replace an existing final disk gho2kvm did not make (as overwrite: true)")

    def with_force_tcg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--force-tcg", action="store_true", default=None,
                        help="libguestfs and domains without KVM (default: settings.force_tcg, "
                             "$GHO2KVM_FORCE_TCG)")

    sp = sub.add_parser("validate", help="check a config file and exit")
    with_config(sp)
    sp.set_defaults(func=cmd_validate)
    sp = sub.add_parser("migrate", help="run the pipeline (resumes where it stopped)")
    with_config(sp)
    sp.add_argument("--workers", "-w", type=int, default=1, help="images processed at once")
    with_force_tcg(sp)
    sp.add_argument("--scheduler", choices=values(Scheduler), default=None,
                    help="local scheduler or a central luigid (default from config settings)")
    sp.add_argument("--scheduler-url", default=None, help="luigid URL, e.g. http://127.0.0.1:8082")
    sp.set_defaults(func=cmd_migrate)
    sp = sub.add_parser("inspect", help="inspect one image and print inspect.json")
    with_config(sp, image_required=True)
    with_force_tcg(sp)
    sp.set_defaults(func=cmd_inspect)
    sp = sub.add_parser("plan", help="print which steps would run and why; touches nothing")
    with_config(sp)
    sp.set_defaults(func=cmd_plan)
    sp = sub.add_parser("scan", help="find the images in folders and write a commented config for them")
    sp.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="folders (or files) to scan")
    out = sp.add_mutually_exclusive_group()
    out.add_argument("--output", "-o", type=Path, help="write the config here (default: print it)")
    out.add_argument("--update", "-u", type=Path, metavar="CONFIG",
                     help="add the images CONFIG does not name yet to it, keeping everything else")
    sp.add_argument("--max-depth", type=int, default=16, help="folders deep (default 16)")
    sp.add_argument("--max-files", type=int, default=100_000, help="entries looked at (default 100000)")
    sp.set_defaults(func=cmd_scan)
    sp = sub.add_parser("report", help="write <workdir>/report.md and report.html")
    with_config(sp)
    sp.set_defaults(func=cmd_report)
    try:
        from pipeline.app.gho_cli import register
    except ImportError:
        pass
    else:
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.configure()
    install_signal_handlers()
    try:
        return int(args.func(args))
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    except Gho2KvmError as e:
        print(e.one_line(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # a file the system refused: named, in its words (no traceback, no class name)
        print(f"error: {plain_error(e)}", file=sys.stderr)
        return 1
    except Terminated as e:
        print(f"{e}; re-run the same command to resume", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
