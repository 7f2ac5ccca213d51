"""Class consistency of the demo generator: does "An image of a {class}" draw that class?

A small classifier is trained on the real ID training images plus the generator's VAE
reconstructions of them (so that decoder blur is not counted as a class error); it then labels
``--per-class`` images generated per class from "An image of a {class}" (PNDM, ``--steps`` steps,
seeded), at each guidance scale of ``--guidance``. Prints one JSON line:

    class_consistency / per_class   at the headline guidance (the first of --guidance)
    sweep                           overall consistency at every guidance
    classifier_accuracy             the classifier on the real held-out ID test images and on their
                                    VAE reconstructions
    real_only                       (with --real-only) the same numbers for a classifier trained on
                                    real images only

and saves a montage (one row per class, headline guidance) as a PNG.

Usage:
    python benchmarks/generator_quality.py [--folder data/demo/generator] [--guidance 5 3 7.5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the generator is a local folder: never ask the hub

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ncis_core import assets  # noqa: E402
from ncis_core import demo_generator as dg  # noqa: E402
from ncis_core.config import load_config  # noqa: E402
from ncis_core.data import get_split  # noqa: E402
from ncis_core.demo_generator.quality import _to_tensor  # noqa: E402
from ncis_core.diffusion import vae_reconstruct  # noqa: E402

__all__ = ["main"]

log = logging.getLogger("generator_quality")


def _montage(generated: np.ndarray, classes: list[str], path: Path, title: str, per_row: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from ncis_core.viz.common import image_grid

    fig = image_grid(classes, [list(row[:per_row]) for row in generated], title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print and return the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--folder", default=None, help="pipeline folder (default: generator.out)")
    parser.add_argument("--guidance", type=float, nargs="+", default=None,
                        help="guidance scales; the first is the headline (default: generate.guidance_scale, 3, 7.5)")
    parser.add_argument("--per-class", type=int, default=None, help="default: generator.eval_per_class")
    parser.add_argument("--steps", type=int, default=None, help="default: generator.eval_steps")
    parser.add_argument("--prompt", default="An image of a {}", help="template; {} is the class name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4, help="classifier epochs")
    parser.add_argument("--real-only", action="store_true", help="also a classifier on real images only")
    parser.add_argument("--montage", default="outputs/generator-quality/montage.png")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: the smoke preset's few images, the shipped generator, 2 per class, 2 steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.folder = "smoke", args.folder or "data/demo/generator"
        args.guidance, args.per_class, args.steps, args.epochs = [5.0], 2, 2, 1
        args.montage = str(Path(os.environ.get("TMPDIR", "/tmp")) / "ncis-generator-quality-smoke.png")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)  # see GeneratorConfig.threads: shared CPUs spin otherwise

    cfg = load_config(args.preset, args.overrides)
    gcfg = cfg.generator
    folder = Path(args.folder or gcfg.out)
    if not folder.is_absolute():  # the repository's folder, else the copy shipped with the package
        folder = ROOT / folder if (ROOT / folder).exists() else (assets.resolve(folder) or ROOT / folder)
    guidance = args.guidance or [cfg.generate.guidance_scale] + [g for g in (3.0, 7.5)
                                                                  if g != cfg.generate.guidance_scale]
    per_class = args.per_class or gcfg.eval_per_class
    steps = args.steps or gcfg.eval_steps
    t0 = time.time()

    pipe = dg.load_pipeline(folder)
    train, test = get_split(cfg.data, "id-train"), get_split(cfg.data, "id-test")
    classes = list(train.classes)
    x_train = _to_tensor(np.stack([train.dataset[i][0] for i in range(len(train.dataset))]))
    x_test = _to_tensor(np.stack([test.dataset[i][0] for i in range(len(test.dataset))]))
    y_train, y_test = np.asarray(train.dataset.labels), np.asarray(test.dataset.labels)
    rec_train, rec_test = vae_reconstruct(pipe.vae, x_train), vae_reconstruct(pipe.vae, x_test)

    clf = dg.train_quality_classifier(torch.cat([x_train, rec_train]), np.concatenate([y_train, y_train]),
                                      len(classes), epochs=args.epochs, seed=args.seed)
    record = {"benchmark": "generator_quality", "class_consistency": None, "per_class": None,
              "guidance": guidance[0], "prompt": args.prompt, "steps": steps, "seed": args.seed, "images_per_class": per_class,
              "folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder)}
    sweep, generated_main, headline = {}, None, None
    for g in guidance:
        generated = dg.generate_per_class(pipe, classes, per_class, g, steps=steps, seed=args.seed,
                                          prompt=args.prompt)
        result = dg.class_consistency(clf, generated, classes)
        sweep[str(g)] = {"class_consistency": round(result["class_consistency"], 4),
                         "min_per_class": round(min(result["per_class"].values()), 4)}
        if generated_main is None:
            generated_main, headline = generated, result
    record["class_consistency"] = round(headline["class_consistency"], 4)
    record["per_class"] = {k: round(v, 4) for k, v in headline["per_class"].items()}
    record["confusion"] = headline["confusion"]
    record["sweep"] = sweep
    record["classifier_accuracy"] = {"real_test": round(dg.accuracy(clf, x_test, y_test), 4),
                                     "vae_recon_test": round(dg.accuracy(clf, rec_test, y_test), 4)}
    if args.real_only:
        real = dg.train_quality_classifier(x_train, y_train, len(classes), epochs=args.epochs, seed=args.seed)
        res = dg.class_consistency(real, generated_main, classes)
        record["real_only"] = {"class_consistency": round(res["class_consistency"], 4),
                               "per_class": {k: round(v, 4) for k, v in res["per_class"].items()},
                               "real_test": round(dg.accuracy(real, x_test, y_test), 4)}
    montage = Path(args.montage)
    montage = montage if montage.is_absolute() else ROOT / montage
    _montage(generated_main, classes, montage,
             f"'{args.prompt.format('{class}')}', guidance {guidance[0]}, {steps} PNDM steps")
    record["montage"] = str(montage.relative_to(ROOT)) if montage.is_relative_to(ROOT) else str(montage)
    record["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
