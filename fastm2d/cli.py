"""The `fastm2d` command: pretrain, adapt, prepare, stats, embed, linear-eval, finetune, report, export."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .atomic import DISK_FULL, write_atomic
from .config import ATTENTION_CHOICES
from .errors import AudioReadError, DataError, MachineFault, UserError, message
from .spellings import settle

# Nothing heavy at import time: `fastm2d --help` answers without loading torch; each command imports its own.
USER_ERRORS = (UserError, FileNotFoundError)


def device_option(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")


def running_options(parser, batch: int = 16, quiet: bool = True) -> None:
    """The options every command that runs a model on audio files shares (embed, tag, zeroshot, linear-eval), declared
    once: --batch-size, --workers (decoding processes), --device, --quiet."""
    parser.add_argument("--batch-size", type=at_least(1), default=batch, help="clips of one length per forward pass")
    parser.add_argument("--workers", type=at_least(0), default=2, help="decoding worker processes")
    device_option(parser)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="auto",
                        help="auto: bf16 on a GPU and on a CPU with bf16 units, else fp32; int8: the encoder's linear "
                             "layers in dynamic int8 on CPU (faster, features move slightly: docs/performance.md)")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _device(name: str) -> str:
    """'auto' -> cuda when there is one, else cpu; an unknown or unavailable device is a ConfigError."""
    from .devices import pick_device
    return str(pick_device(name))


def cmd_pretrain(args) -> None:
    from .config import load_config
    from .train import pretrain

    config = load_config(args.config, args.overrides)
    if args.config is None and not args.resume:  # the defaults are the paper's full AudioSet run: say so first
        m, t = config.model, config.train
        length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
        print(f"fastm2d pretrain: no --config: starting the paper's recipe, a ViT-{m.size} M2D ({m.embed_dim} wide, "
              f"{m.depth} blocks, input {m.input_size[0]}x{m.input_size[1]}) on data.train={config.data.train} for "
              f"{length} at batch {t.batch_size} into {config.out_dir} (configs/demo.yaml is the 3-minute CPU "
              f"demo)", file=sys.stderr, flush=True)
    trainer = pretrain(config, resume=args.resume)
    if trainer.preempted is None:
        print(f"done: {trainer.step} steps; checkpoints and metrics.jsonl in {config.out_dir}")


def cmd_adapt(args) -> None:
    from .train import Trainer
    from .train.adapt import adapt_config, describe_plan

    config = adapt_config(args.audio, args.weights, args.noise, args.out, args.overrides)
    trainer = Trainer(config, resume=args.resume)
    print(describe_plan(trainer), flush=True)

    def report(seconds: float) -> None:
        hours = seconds * (trainer.total_steps - trainer.step) / 3600
        print(f"measured {seconds:.2f} s per optimiser step: about {hours:.1f} h for the remaining "
              f"{trainer.total_steps - trainer.step} steps", flush=True)

    trainer.step_timer = report
    trainer.fit()
    print(f"done: {trainer.step} steps; checkpoints in {config.out_dir}")


def cmd_stats(args) -> None:
    from .config import load_config
    from .data.stats import dataset_stats

    record, bad = dataset_stats(args.data, load_config(args.config, args.overrides), args.items)
    for b in bad:  # truncated, too short, undecodable ...: each named with its reason, left out
        print(f"skipped: {b}", file=sys.stderr)
    text = json.dumps(record)
    if args.out:
        write_atomic(args.out, text + "\n")
    print(text)
    mean, std = record["norm_stats"]
    print(f"use it with: data.norm_stats=[{mean:.4f},{std:.4f}]", file=sys.stderr)


def cmd_prepare(args) -> None:
    from .data.prepare import prepare

    if args.format in ("shards", "logmel-shards"):  # streamed training (no shared file system): tar shards
        from .data.shards import write_shards
        logmel = dict(sample_rate=args.sample_rate, crop_frames=args.crop_frames, dtype=args.dtype,
                      min_patch_frames=args.min_patch_frames) if args.format == "logmel-shards" else None
        print(json.dumps(write_shards(args.src, args.out, args.files_per_shard, args.root, progress=True,
                                      labels=args.labels, logmel=logmel, workers=args.workers)))
        return
    if args.labels:
        raise UserError("--labels goes into streamed shards (--format shards); a store's training run reads "
                          "labels from offline.labels")
    summary = prepare(args.src, args.out, workers=args.workers, files_per_shard=args.files_per_shard,
                      dtype=args.dtype, sample_rate=args.sample_rate, crop_frames=args.crop_frames,
                      stats_items=args.stats_items, root=args.root, min_patch_frames=args.min_patch_frames)
    print(json.dumps(summary))


def cmd_embed(args) -> None:
    from .transfer.embed_corpus import embed_corpus
    from .transfer.runtime import load_encoder

    runtime = load_encoder(args.weights, device=_device(args.device)).set_precision(args.precision)
    stats = embed_corpus(runtime, args.files, args.out, level=args.level, layers=args.layers or None,
                         batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
    print(f"wrote {stats['written']} feature files to {args.out}"
          + (f"; {stats['skipped']} already there" if stats["skipped"] else "")
          + (f"; {stats['failed']} failed" if stats["failed"] else "") + f" ({stats['clips_per_s']:.1f} clips/s)")
    if stats["written"]:
        total = max(sum(stats["seconds"].values()), 1e-9)
        print("time: " + ", ".join(f"{k} {v:.3g} s ({100 * v / total:.0f} %)" for k, v in stats["seconds"].items()))
    if stats["failed"] and not stats["written"] and not stats["skipped"]:
        raise AudioReadError("no file could be read")


def cmd_linear_eval(args) -> None:
    from .config import settings_from
    from .eval.linear import ProbeConfig
    from .eval.probe import RESULTS_HEADER, probe_weights

    probe = settings_from(ProbeConfig, {}, args.overrides, "linear-eval")
    rows = probe_weights(args.weights, args.task, Path(args.out), probe, args.seeds, args.layers, args.hidden or (),
                         args.untrained_seed if args.untrained else None, args.batch_size, _device(args.device),
                         progress=not args.quiet, precision=args.precision, workers=args.workers)
    print(RESULTS_HEADER + "\n" + "\n".join(rows))


def cmd_finetune(args) -> None:
    from .config import settings_from
    from .eval.finetune import FinetuneConfig, finetune
    from .eval.tasks import load_tasks

    options = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "layer_decay", "optimizer", "mixup", "seed",
                                             "attention", "compile")}
    cfg = settings_from(FinetuneConfig, options, args.overrides, "finetune")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for task in load_tasks(args.task):
        r = finetune(args.weights, task, args.out, cfg, device=_device(args.device), frames=args.frames)
        print(f"{task.name}: best valid {r['metric']} {100 * r['valid']:.2f} %, test {100 * r['test']:.2f} % "
              f"-> {Path(args.out) / f'finetuned-{task.name}.pth'}")


def cmd_tag(args) -> None:
    from .transfer.classifier import format_tag_rows, load_classifier, tag_files

    tagger = load_classifier(args.weights, device=_device(args.device))
    tagger.runtime.set_precision(args.precision)
    failed = []
    rows = tag_files(tagger, args.files, args.topk, args.frames, args.batch_size, args.workers,
                     on_skip=lambda e: (print(f"skipped: {e}", file=sys.stderr), failed.append(e)),
                     progress=not args.quiet)
    text = format_tag_rows(rows, bool(args.out) and str(args.out).endswith(".csv"))
    if args.out:
        write_atomic(args.out, text)
    else:
        print(text, end="")
    if len(failed) == len(args.files):
        raise AudioReadError("no file could be read")


def cmd_zeroshot(args) -> None:
    from .transfer.clap import ZeroShot, zeroshot_files

    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    if len(labels) < 2:
        raise DataError(f"--labels {args.labels!r}: give at least two comma-separated labels")
    zs = ZeroShot(args.weights, args.text_encoder, device=_device(args.device))
    zs.runtime.set_precision(args.precision)
    for row in zeroshot_files(zs, args.files, labels, args.topk, batch_size=args.batch_size, workers=args.workers,
                              on_skip=lambda e: print(f"skipped: {e}", file=sys.stderr)):
        print(json.dumps(row))


def cmd_report(args) -> None:
    from .train.report import write_report

    print(write_report(args.run))


def cmd_export(args) -> None:
    from .checkpoint import export_original

    if args.format == "onnx":
        from .transfer.onnx_export import export_onnx
        print(export_onnx(args.weights, args.out))
        return
    if args.format == "xares":
        from .transfer.interfaces.xares import write_encoder_file
        print(write_encoder_file(args.weights, args.out, args.name, args.untrained_seed))
        return
    print(export_original(args.weights, args.out, encoder_only=args.encoder_only, fmt=args.format))


def at_least(minimum: int):
    """argparse type: an integer >= minimum (the message names the value; argparse names the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be >= {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def int_list(text: str) -> list:
    """argparse type: comma-separated integers, e.g. 3,7,11."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 3,7,11") from None


class Parser(argparse.ArgumentParser):
    """Every --help shows the defaults."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fastm2d", description="Masked Modeling Duo pre-training and transfer")
    p.add_argument("--version", action="version", version=f"fastm2d {__version__}")
    sub = p.add_subparsers(dest="command", required=True)  # subcommands are built as Parser too

    pt = sub.add_parser("pretrain", help="pre-train M2D (the embedded synthetic data by default)")
    pt.add_argument("--config", help="YAML config (see configs/)")
    pt.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    pt.add_argument("--out", help="run folder (the same as out_dir=DIR)")
    pt.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    pt.set_defaults(func=cmd_pretrain)

    ad = sub.add_parser("adapt", help="further pre-train released weights on your own (small) data: M2D-X with the "
                                      "starting model as a regulariser, noise mixing, batch 128, 10k items/epoch")
    ad.add_argument("audio", help="folder or CSV of your audio files")
    ad.add_argument("--weights", help="checkpoint to start from (ours or the original's)")
    ad.add_argument("--from", dest="from_", help=argparse.SUPPRESS)  # 0.1's spelling of --weights
    ad.add_argument("--noise", help="folder or CSV of background noise (mixed at eta 0.3)")
    ad.add_argument("--out", default="runs/adapt", help="run folder")
    ad.add_argument("--resume", action="store_true", help="continue the run in --out")
    ad.add_argument("overrides", nargs="*", help="key=value overrides of the recipe, e.g. train.epochs=100")
    ad.set_defaults(func=cmd_adapt, weights_required=True)

    st = sub.add_parser("stats", help="dataset mean/std of log-mel over random crops (-> data.norm_stats)")
    st.add_argument("data", help="folder or CSV list of audio / .npy files")
    st.add_argument("--config", help="YAML config for the front end and crop size")
    st.add_argument("--items", type=at_least(1), default=10000, help="random crops the statistics use")
    st.add_argument("--out", help="write the JSON result here too")
    st.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.input_size=[80,208]")
    st.set_defaults(func=cmd_stats)

    pr = sub.add_parser("prepare", help="audio / .npy files -> memory-mapped log-mel shards (a LogMelStore)")
    pr.add_argument("src", help="folder (recursive) or CSV list of audio or original .npy log-mel files")
    pr.add_argument("positional_out", nargs="?", help=argparse.SUPPRESS)  # 0.1's spelling of --out
    pr.add_argument("--out", help="store folder; re-running completes an interrupted preparation")
    pr.add_argument("--workers", type=at_least(0), default=None,
                    help="worker processes; 0 = in this process (as data.num_workers=0); default: one per core")
    pr.add_argument("--format", choices=("store", "shards", "logmel-shards"), default="store",
                    help="store: memory-mapped log-mel shards; shards: tar shards of the original audio bytes "
                         "(webdataset layout) for training streamed over HTTP or a pipe, with shards.json; "
                         "logmel-shards: tar shards of the log-mel a store holds (no decoding while training) "
                         "(default: %(default)s)")
    pr.add_argument("--files-per-shard", type=at_least(1), default=1000, help="files per shard")
    pr.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored precision")
    pr.add_argument("--sample-rate", type=int, default=16000, help="front end: 16000 or 32000")
    pr.add_argument("--crop-frames", type=at_least(1), default=608,
                    help="the longest training crop the store serves: short clips are zero-padded to it plus 20 ms "
                         "(608: 6.1 s, as the original); shorter crops read less")
    pr.add_argument("--stats-items", type=at_least(1), default=10000, help="random crops for stats.json")
    pr.add_argument("--min-patch-frames", type=at_least(1), default=16,
                    help="files with less audio than this many frames (one patch width) are listed as failures")
    pr.add_argument("--root", help="base folder for relative paths in a CSV")
    pr.add_argument("--labels", help="with --format shards / logmel-shards: a CSV of file,labels whose labels go into "
                                     "each sample's JSON (for offline.task=labels from the shards)")
    pr.set_defaults(func=cmd_prepare, out_required=True)

    em = sub.add_parser("embed", help="audio files, folders or CSV lists -> features (.npy per clip, mirrored "
                                      "paths, manifest.jsonl; re-run to resume)")
    em.add_argument("--weights", required=True, help="fastm2d checkpoint / run folder, or original weights")
    em.add_argument("--out", required=True, help="output folder")
    em.add_argument("--level", choices=("frame", "clip", "scene", "timestamp"), default="frame",
                    help="frame: (T', D) per file; clip (= scene): the time mean (HEAR scene embedding); timestamp: "
                         "frames plus <name>.timestamps.npy with each frame's centre in ms (HEAR timestamp embeddings)")
    em.add_argument("--layers", type=int_list, help="comma-separated block indices to concatenate (default: the output)")
    running_options(em)
    em.add_argument("files", nargs="+", help="audio files, folders (searched recursively) or CSV lists")
    em.set_defaults(func=cmd_embed)

    le = sub.add_parser("linear-eval", help="the paper's linear-evaluation protocol on a task (CSV, folder with "
                                            "meta.csv, or 'synthetic')")
    le.add_argument("task", help="CSV (file_name, label, split), a folder with meta.csv, or 'synthetic'")
    le.add_argument("positional", nargs="*", metavar="key=value",
                    help="overrides of the probe: lr, max_epochs, patience, batch_size (the probe's own)")
    le.add_argument("--weights", help="run folder, checkpoint, or the original's weights")
    le.add_argument("--seeds", type=at_least(1), default=5, help="probe seeds (mean and 95 %% CI over them)")
    le.add_argument("--out", default="eval", help="results <task>.json, results.md and the embedding cache")
    le.add_argument("--layers", type=int_list, help="comma-separated block indices to concatenate (default: the final output)")
    le.add_argument("--hidden", type=int_list, help="comma-separated hidden layer sizes (default: none, a linear probe)")
    le.add_argument("--untrained", action="store_true", help="the same architecture, freshly initialised (baseline)")
    le.add_argument("--untrained-seed", type=int, default=0, help="initialisation seed of --untrained")
    running_options(le, batch=64)
    le.set_defaults(func=cmd_linear_eval, weights_required=True, overrides=[])

    ft = sub.add_parser("finetune", help="fine-tune the encoder + a linear head on a task (the original's recipe family)")
    ft.add_argument("task", help="CSV (file_name, label, split), a folder with meta.csv, or 'synthetic'")
    ft.add_argument("positional", nargs="*", metavar="key=value",
                    help="overrides of the recipe: weight_decay, warmup_epochs, freq_mask, time_mask, rrc, and the "
                         "options below (epochs, lr, ...)")
    ft.add_argument("--weights", help="run folder, checkpoint, or the original's weights")
    ft.add_argument("--out", default="finetune", help="output folder")
    ft.add_argument("--epochs", type=int, default=50, help="training epochs")
    ft.add_argument("--batch-size", type=at_least(1), default=32, help="clips per step")
    ft.add_argument("--lr", type=float, default=1e-3, help="head learning rate")
    ft.add_argument("--layer-decay", type=float, default=0.75, help="lr factor per block below the head")
    ft.add_argument("--optimizer", choices=("adamw", "lars", "sgd"), default="adamw", help="optimiser")
    ft.add_argument("--mixup", type=float, default=0.3, help="mixup alpha (0 = off)")
    ft.add_argument("--frames", type=at_least(0), default=0, help="clip length in frames (default: the task's median)")
    ft.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    ft.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                    help="attention backend")
    ft.add_argument("--compile", action="store_true", help="torch.compile the classifier (pays off on long runs)")
    device_option(ft)
    ft.set_defaults(func=cmd_finetune, weights_required=True, overrides=[])

    tg = sub.add_parser("tag", help="audio files -> class scores from a fine-tuned head (the original's AS-FT "
                                    "weights: AudioSet's 527 classes; or `fastm2d finetune` output)")
    tg.add_argument("files", nargs="+", help="audio files")
    tg.add_argument("--weights", required=True, help="weights with a classifier head")
    tg.add_argument("--topk", type=at_least(1), default=5, help="labels per clip (or per frame)")
    tg.add_argument("--frames", action="store_true", help="scores per feature frame with its centre time in ms "
                                                          "(sound event detection)")
    tg.add_argument("--out", help="write here: .csv (one row per label) or JSON lines; default: print JSON lines")
    running_options(tg)
    tg.set_defaults(func=cmd_tag)

    zs = sub.add_parser("zeroshot", help="M2D-CLAP: rank text labels for each audio file (cosine similarity in the "
                                         "audio-text space)")
    zs.add_argument("files", nargs="+", help="audio files")
    zs.add_argument("--weights", required=True, help="M2D-CLAP weights (with audio_proj / text_proj)")
    zs.add_argument("--labels", required=True, help='comma-separated labels, e.g. "dog barking,rain,siren"')
    zs.add_argument("--text-encoder", help="local folder of the text encoder (default: the one the release name "
                                           "declares, from the local Hugging Face cache; never downloaded)")
    zs.add_argument("--topk", type=at_least(1), default=5, help="labels shown per file")
    running_options(zs, quiet=False)
    zs.set_defaults(func=cmd_zeroshot)

    rp = sub.add_parser("report", help="figures (PNG) and a one-page markdown summary of a run")
    rp.add_argument("run", help="run folder (holds metrics.jsonl)")
    rp.set_defaults(func=cmd_report)

    ex = sub.add_parser("export", help="write a checkpoint in the original M2D folder/file layout")
    ex.add_argument("positional", nargs="*", help=argparse.SUPPRESS)  # 0.1's spelling: CHECKPOINT OUT
    ex.add_argument("--weights", help="fastm2d checkpoint or run folder")
    ex.add_argument("--out", help="folder to create the <name>-<F>x<T>p<pF>x<pT>-<date>/ folder in")
    ex.add_argument("--encoder-only", action="store_true", help="only the encoder's weights (the original's "
                                                                "to_encoder_only_weight.py layout)")
    ex.add_argument("--format", choices=("pth", "safetensors", "onnx", "xares"), default="pth",
                    help="safetensors: weights and config without any pickle (safe to publish and to load); onnx: "
                         "the encoder graph (log-mel in) + frontend.json, for onnxruntime and other runtimes; xares: "
                         "the encoder file X-ARES's runner builds with no arguments (--out FILE.py or a folder)")
    ex.add_argument("--name", help="xares: the class name's start (default: the weights' folder name)")
    ex.add_argument("--untrained-seed", type=int, help="xares: the same architecture freshly initialised with "
                                                        "this seed, a baseline row beside the model")
    ex.set_defaults(func=cmd_export, weights_required=True, out_required=True)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:  # argparse's own errors (a bad option value) are user errors too: one line, exit 2, no SystemExit
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    # key=value overrides may also follow options (`fastm2d adapt AUDIO --from W train.epochs=100`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        print(f"fastm2d {args.command}: error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    try:
        settle(args)  # one spelling: --weights, --out, key=value (the old ones warned)
        args.func(args)
    except USER_ERRORS as e:
        print(f"fastm2d {args.command}: error: {message(e)}", file=sys.stderr)
        return 2
    except MachineFault as e:  # faults of the machine, not of the input
        print(f"fastm2d {args.command}: error: {message(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # every writer goes through atomic.py: the target is untouched, its temporary file gone
        if e.errno not in DISK_FULL:
            raise
        print(f"fastm2d {args.command}: error: cannot write {e.filename or 'its output'}: {e.strerror} (the disk is "
              f"full, or a quota or file-size limit is reached); nothing half-written was left: free space and rerun",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
