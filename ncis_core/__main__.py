"""The command line: ``python -m ncis_core COMMAND``, one subcommand per job (``--help`` lists them).

Errors a researcher can fix print one message and exit with status 2 (:mod:`ncis_core.errors`).

    python -m ncis_core run --preset smoke --out outputs/smoke --set cvpn.epochs=1 --stages 0-2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept separate so tests can inspect it)."""
    parser = argparse.ArgumentParser(prog="python -m ncis_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute the notebook series with papermill")
    run.add_argument("--preset", required=True, help="a preset name (see `presets`)")
    run.add_argument("--out", required=True, help="the run folder")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                     help="override a config value (repeatable)")
    run.add_argument("--stages", default=None, help="stages to run, e.g. 1-6 or 0,2-3 (default: all)")
    run.add_argument("--quiet", action="store_true", help="no per-cell progress bar")

    sub.add_parser("presets", help="list the presets, one line each")

    ev = sub.add_parser("evaluate", help="stage 6 on a classifier checkpoint, without training")
    ev.add_argument("--preset", required=True)
    ev.add_argument("--checkpoint", required=True,
                    help="the kit's classifier/best.safetensors, a torchvision-layout state dict, or a "
                         "released CIFAR checkpoint (encoder.*/shortcut.* keys)")
    ev.add_argument("--out", default=None, help="run folder for results/ (default outputs/eval-<preset>)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE")

    strip = sub.add_parser("strip-notebooks", help="remove outputs from notebooks before committing")
    strip.add_argument("folder", nargs="?", default="notebooks")

    gen = sub.add_parser("train-generator",
                         help="train the demo world's small SD-architecture generator (resumable)")
    gen.add_argument("--preset", default="demo")
    gen.add_argument("--out", default=None, help="pipeline folder (default: generator.out)")
    gen.add_argument("--work", default=None, help="checkpoint folder (default: generator.work_dir)")
    gen.add_argument("--fresh", action="store_true", help="delete the checkpoints and start over")
    gen.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE")

    cmp = sub.add_parser("compare", help="one classifier per outlier method and seed, mean ± std table")
    cmp.add_argument("--preset", required=True)
    cmp.add_argument("--out", required=True, help="the run folder holding stages 1-4")
    cmp.add_argument("--methods", default=None,
                     help="comma-separated outlier methods of the registry (built in: none, idgen, linear, "
                          "ncis, knn_boundary; default: every registered method)")
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated classifier seeds")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE")

    st = sub.add_parser("status", help="each stage of a run folder: current, stale (why) or missing")
    st.add_argument("--out", required=True, help="the run folder")
    st.add_argument("--json", action="store_true", help="one JSON object instead of the table")

    pl = sub.add_parser("plan", help="cost and preflight of a run, before it starts (nothing is computed)")
    pl.add_argument("--preset", required=True)
    pl.add_argument("--out", default=None, help="the run folder to check (default outputs/<preset>)")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE")
    pl.add_argument("--gpu", default="h100", help="h100, h200, a100, cpu (measured) or NAME:TFLOPS")
    pl.add_argument("--fraction", type=float, default=0.4,
                    help="assumed fraction of the card's datasheet rate reached (default 0.4)")
    pl.add_argument("--gpus", type=int, default=1, help="processes under accelerate launch")
    pl.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    pl.add_argument("--compare", default=None, metavar="METHODS:SEEDS",
                    help="also plan a compare run, e.g. none,idgen,linear,ncis:0,1,2 (make demo runs that)")

    sub.add_parser("compile-kernels", help="compile umap-learn's numba kernels into numba's disk cache "
                                           "(make setup runs it: the first UMAP map then does not wait for it)")

    data = sub.add_parser("datasets", help="one JSON line per split of a preset")
    data.add_argument("--preset", required=True)
    data.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE")
    return parser


def _cmd_presets(args) -> int:
    from .config import available_presets, preset_summary

    names = available_presets()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {preset_summary(name)}")
    return 0


def _cmd_datasets(args) -> int:
    from .config import load_config
    from .data import build_splits

    cfg = load_config(args.preset, args.overrides)
    for split in build_splits(cfg.data):
        print(json.dumps(split.describe()), flush=True)
    return 0


def _cmd_evaluate(args) -> int:
    from .config import load_config
    from .runs import RunDir
    from .stages import evaluate

    cfg = load_config(args.preset, args.overrides, out=args.out or f"outputs/eval-{args.preset}")
    run = RunDir.create(cfg)
    evaluate.run(cfg, run, checkpoint=args.checkpoint)
    print(run.path("table_md").read_text())
    print(f"results: {run.path('results_dir')}")
    return 0


def _cmd_plan(args) -> int:
    from .config import load_config
    from .plan import format_plan, plan

    cfg = load_config(args.preset, args.overrides, out=args.out or f"outputs/{args.preset}")
    compare = None
    if args.compare:
        methods, _, seeds = args.compare.partition(":")
        try:
            compare = ([m for m in methods.split(",") if m], [int(x) for x in seeds.split(",") if x.strip()])
        except ValueError:
            raise ValueError(f"--compare {args.compare!r}: use METHODS:SEEDS, e.g. none,ncis:0,1,2") from None
    report = plan(cfg, card=args.gpu, fraction=args.fraction, gpus=args.gpus, compare=compare)
    print(json.dumps(report) if args.json else format_plan(report), end="\n" if args.json else "")
    return 0 if report["preflight"]["ok"] else 2


def _cmd_strip(args) -> int:
    from pathlib import Path

    from .notebook import strip_outputs

    for path in sorted(Path(args.folder).rglob("*.ipynb")):
        if ".ipynb_checkpoints" not in path.parts and strip_outputs(path):
            print(f"stripped {path}")
    return 0


def _cmd_train_generator(args) -> int:
    from .config import load_config
    from .demo_generator import train_generator

    cfg = load_config(args.preset, args.overrides)
    out = train_generator(cfg, out=args.out, work=args.work, fresh=args.fresh)
    print(f"generator: {out}")
    return 0


def _cmd_compare(args) -> int:
    from .compare import compare

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: use comma-separated integers, e.g. 0,1,2") from None
    if args.methods is None:
        from .outliers import method_names

        methods = method_names()
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    compare(args.preset, args.out, methods, seeds, args.overrides)
    from .runs import ARTEFACTS

    print((Path(args.out) / ARTEFACTS["compare_dir"] / "table.md").read_text())
    return 0


def _cmd_status(args) -> int:
    from .runs import RunDir

    run = RunDir.open(args.out)
    if args.json:
        print(json.dumps({st.stage: {"state": st.state, "reason": st.reason, "earliest": st.earliest}
                          for st in run.status()}))
    else:
        print(run.format_status(), end="")
    return 0


def _cmd_compile_kernels(args) -> int:
    from .viz.maps import compile_umap_kernels

    print(f"umap-learn's numba kernels compiled and cached in {compile_umap_kernels():.0f} s")
    return 0


def _cmd_run(args) -> int:
    from .runner import run_series

    executed = run_series(args.preset, args.out, args.overrides, stages=args.stages,
                          progress=not args.quiet)
    for path in executed:
        print(f"executed {path}")
    print(f"run folder: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .errors import environment_fault, report, user_errors

    commands = {"run": _cmd_run, "presets": _cmd_presets, "datasets": _cmd_datasets, "evaluate": _cmd_evaluate,
                "strip-notebooks": _cmd_strip, "train-generator": _cmd_train_generator,
                "compare": _cmd_compare, "plan": _cmd_plan, "status": _cmd_status,
                "compile-kernels": _cmd_compile_kernels}
    try:
        return commands[args.command](args)
    except user_errors() as exc:
        return report(exc)
    except OSError as exc:  # a full disk, no permission, a read-only file system: one line too
        if not environment_fault(exc):
            raise
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
