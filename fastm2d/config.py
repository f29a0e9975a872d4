"""The configuration schema: typed dataclasses, YAML files and `key=value` overrides (OmegaConf).

The dataclasses below are the single source of truth for every key. `load_config` merges, in order, the
defaults, a YAML file and dotted command-line overrides; an unknown key or a value of the wrong type is a
`ConfigError` that names the key.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError  # noqa: F401  (re-exported)

# Each setting's choices, typed once: the schema checks them, the command line offers them, the code reads them.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")  # fastm2d/devices.py decides `auto`
ATTENTION_CHOICES = ("auto", "sdpa", "xformers", "reference")  # model/attention.py implements each
KERNEL_CHOICES = ("auto", "triton", "reference")  # kernels/ holds both paths of every fused operation
ENGINE_CHOICES = ("auto", "single", "deepspeed")
ZERO_STAGES = (0, 1, 2)  # stage 3 partitions the weights the EMA target update reads whole on every rank


def unseen_frames(m: "ModelConfig") -> str:
    """'' when the patch divides the input; else what the rounded-down grid leaves out (the original rounds down
    too: its recommended 80x1001 16x16 models see 62 patches = 992 of every 1001 frames)."""
    grid = (m.input_size[0] // m.patch_size[0], m.input_size[1] // m.patch_size[1])
    left = (m.input_size[0] - grid[0] * m.patch_size[0], m.input_size[1] - grid[1] * m.patch_size[1])
    if left[1] == 0:
        return ""
    return (f"input {m.input_size[0]}x{m.input_size[1]} at patch {m.patch_size[0]}x{m.patch_size[1]}: a grid of "
            f"{grid[0]} x {grid[1]}; the last {left[1]} of each {m.input_size[1]} frames are not seen, as in the "
            f"original")


def _expected(choices) -> str:
    names = [str(c) for c in choices]
    return f"{', '.join(names[:-1])} or {names[-1]}"

# Encoder presets (docs/spec.md "Model"); explicit model.embed_dim / depth / num_heads override them.
VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=4, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


# The largest model fastm2d builds (a ViT-Large M2D is about 0.4 G parameters): checked on every config, the ones
# read from checkpoints included, BEFORE anything is allocated. FASTM2D_MAX_PARAMS raises it for bigger research.
MAX_PARAMS = int(float(os.environ.get("FASTM2D_MAX_PARAMS", 4e9)))
MAX_TOKENS = 65536  # patches per input: 80x608 at 16x16 is 190, at 80x2 304; 10 s at 16x4 is 1250


OFF_LOSSES = ("norm_mse", "bce", "ce", "clip")
TEXT_POOLINGS = ("mean", "cls")
OFFLINE_TASKS = ("none", "labels", "distill", "regularize", "clap")


def estimated_params(m: "ModelConfig") -> int:
    """Parameters of M2D with this config, from the sizes alone (Python integers: no overflow, no tensors)."""
    tokens = (m.input_size[0] // m.patch_size[0]) * (m.input_size[1] // m.patch_size[1])
    hidden = int(m.mlp_ratio * m.embed_dim)
    block = lambda d, h: 4 * d * d + 2 * d * h + 9 * d + h  # noqa: E731  qkv + proj + mlp + norms + biases
    encoder = m.depth * block(m.embed_dim, hidden) + (tokens + 1) * m.embed_dim
    decoder = m.decoder_depth * block(m.decoder_embed_dim, int(m.mlp_ratio * m.decoder_embed_dim)) \
        + (tokens + 1) * m.decoder_embed_dim + 2 * m.embed_dim * m.decoder_embed_dim
    return 2 * encoder + decoder + m.patch_size[0] * m.patch_size[1] * m.embed_dim + m.off_dim * m.embed_dim * 80


@dataclass
class ModelConfig:
    size: str = "base"
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    input_size: List[int] = field(default_factory=lambda: [80, 608])  # (mel bins, frames)
    patch_size: List[int] = field(default_factory=lambda: [16, 16])  # (freq, time)
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.7
    mask_mode: str = "random"  # random (unstructured, the paper's) | time (whole time columns: 1-D time masks)
    loss: str = "norm_mse"  # norm_mse (eq. 2) | mse (plain MSE on standardised targets, the original's ablation)
    target_layers: List[int] = field(default_factory=list)  # average these target blocks' outputs; [] = the last
    # M2D-X offline branch (paper III-B); normally filled in from `offline.task` by the trainer.
    off_dim: int = 0  # offline_predictor width: Linear(F'*D -> off_dim); 0 = no offline branch. clip: the captions' width
    # norm_mse (distillation, regularisation) | bce (multi-label) | ce (single-label) | clip (M2D-CLAP: audio_proj,
    # text_proj and a learnable temperature instead of offline_predictor)
    off_loss: str = "norm_mse"
    text_encoder: Optional[str] = None  # clip: the caption encoder trained against (zero-shot reads captions with it)
    text_pooling: str = "mean"  # clip: how that encoder's tokens become one embedding: mean | cls
    lambda_m2d: float = 1.0
    # None: the offline task's own weight, as the original trains it (LAMBDA_OFF; e.g. CLAP 0.01, not 1.0)
    lambda_off: Optional[float] = None
    attention: str = "auto"  # auto | sdpa | xformers | reference
    kernels: str = "auto"  # auto | triton | reference (FASTM2D_KERNELS wins)

    def resolved(self) -> "ModelConfig":
        """A copy with the size preset filled in and every value checked."""
        if self.size not in VIT_SIZES:
            raise ConfigError(f"model.size={self.size!r}: expected one of {sorted(VIT_SIZES)}")
        out = ModelConfig(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(self).items()})
        for key, value in VIT_SIZES[self.size].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if out.lambda_off is None:  # a model built without a Config (load_config fills it from offline.task)
            out.lambda_off = LAMBDA_OFF["clap"] if out.off_loss == "clip" else 1.0
        check_model_config(out)
        return out


def check_model_config(m: ModelConfig) -> None:
    if len(m.input_size) != 2 or len(m.patch_size) != 2:
        raise ConfigError(f"model.input_size and model.patch_size need two numbers, got {m.input_size}, {m.patch_size}")
    for key in ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)}: must be >= 1")
    if min(m.input_size) < 1 or min(m.patch_size) < 1:
        raise ConfigError(f"model.input_size={m.input_size}, model.patch_size={m.patch_size}: sizes must be >= 1")
    if not m.mlp_ratio > 0:
        raise ConfigError(f"model.mlp_ratio={m.mlp_ratio}: must be > 0")
    tokens = (m.input_size[0] // m.patch_size[0]) * (m.input_size[1] // m.patch_size[1])
    if tokens > MAX_TOKENS:
        raise ConfigError(f"model.input_size={m.input_size} at patch {m.patch_size}: {tokens} patches, more than "
                          f"the {MAX_TOKENS} fastm2d handles")
    if estimated_params(m) > MAX_PARAMS:
        raise ConfigError(f"model sizes (embed_dim {m.embed_dim}, depth {m.depth}, decoder {m.decoder_embed_dim} x "
                          f"{m.decoder_depth}, {tokens} patches) give about {estimated_params(m) / 1e9:.3g} G "
                          f"parameters, over the limit of {MAX_PARAMS / 1e9:.3g} G (FASTM2D_MAX_PARAMS raises it)")
    if m.input_size[0] % m.patch_size[0]:  # no release does this; eq. 4 stacks whole frequency patches
        raise ConfigError(f"model.patch_size {m.patch_size} does not divide the {m.input_size[0]} mel bins of "
                          f"model.input_size {m.input_size}")
    if m.input_size[1] < m.patch_size[1]:  # time: rounded down to whole patches, as the original (80x1001 at 16)
        raise ConfigError(f"model.input_size {m.input_size} is shorter than one patch {m.patch_size}")
    if m.embed_dim % m.num_heads or m.decoder_embed_dim % m.decoder_num_heads:
        raise ConfigError("model.embed_dim (decoder_embed_dim) must be divisible by num_heads (decoder_num_heads)")
    if m.embed_dim % 4 or m.decoder_embed_dim % 4:
        raise ConfigError("the 2-D sin-cos position encoding needs widths divisible by 4")
    if not 0.0 < m.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio={m.mask_ratio}: must lie strictly between 0 and 1")
    if m.mask_mode not in ("random", "time"):
        raise ConfigError(f"model.mask_mode={m.mask_mode!r}: expected random or time")
    if m.loss not in ("norm_mse", "mse"):
        raise ConfigError(f"model.loss={m.loss!r}: expected norm_mse or mse")
    bad_layers = [i for i in m.target_layers if not 0 <= i < m.depth]
    if bad_layers:
        raise ConfigError(f"model.target_layers={m.target_layers}: block indices must lie in 0..{m.depth - 1}")
    if m.off_dim < 0 or m.off_loss not in OFF_LOSSES:
        raise ConfigError(f"model.off_dim={m.off_dim}, model.off_loss={m.off_loss!r}: expected off_dim >= 0 and "
                          f"off_loss {_expected(OFF_LOSSES)}")
    if m.text_pooling not in TEXT_POOLINGS:
        raise ConfigError(f"model.text_pooling={m.text_pooling!r}: expected {_expected(TEXT_POOLINGS)}")
    if m.lambda_m2d < 0 or m.lambda_off < 0:
        raise ConfigError(f"model.lambda_m2d={m.lambda_m2d}, model.lambda_off={m.lambda_off}: must be >= 0")
    if m.attention not in ATTENTION_CHOICES:
        raise ConfigError(f"model.attention={m.attention!r}: expected {_expected(ATTENTION_CHOICES)}")
    if m.kernels not in KERNEL_CHOICES:
        raise ConfigError(f"model.kernels={m.kernels!r}: expected {_expected(KERNEL_CHOICES)}")


@dataclass
class NoiseConfig:
    """M2D-X background noise (paper eq. 5): mixed into every training crop on the device when eta > 0."""
    train: Optional[str] = None  # None = off; 'synthetic', a prepared store, a folder or a CSV
    root: Optional[str] = None
    eta: float = 0.0  # noise ratio: 0.3 (ICBHI), 0.01 (SPRSound), 0.2 (speech)
    norm_stats: Optional[List[float]] = None  # the noise set's [mean, std]; its mean centres the noise
    # noisy_m2d (the paper): the M2D branch gets the noisy mix, the offline teacher the clean input (denoising);
    # noisy_teacher: the reverse, as one original distillation script does.
    direction: str = "noisy_m2d"


@dataclass
class OfflineConfig:
    """M2D-X's offline task (paper III-B). Each task fills model.off_dim / off_loss when they are left at 0."""
    # none | labels (M2D-AS) | distill (M2D-S, a domain teacher) | regularize (further pre-training) | clap (M2D-CLAP)
    task: str = "none"
    teacher: Optional[str] = None  # distill: a checkpoint run on the device; regularize: default train.init_from
    features: Optional[str] = None  # distill: folder of precomputed teacher features, <audio stem>.npy = (T, D)
    feature_rate: float = 50.0  # Hz of the precomputed features (HuBERT: 50)
    labels: Optional[str] = None  # labels: CSV of file_name and labels (names or indices, comma-separated)
    classes: Optional[str] = None  # labels: text file, one class per line (default: every name in the CSV, sorted)
    single_label: bool = False  # labels: cross-entropy over one class per clip instead of multi-label BCE
    balanced: bool = False  # labels: label-balanced sampling (item weights from label frequencies)
    captions: Optional[str] = None  # clap: CSV of file_name and caption (a row per caption; default data.train)
    text_encoder: Optional[str] = None  # clap: a local Hugging Face folder or cached model id that encodes captions
    text_pooling: str = "mean"  # clap: mean over tokens (GTE, sentence-transformers) | cls (BERT)
    caption_embeddings: Optional[str] = None  # clap: precomputed .npz, key = audio file stem, (D,) or (n, D)
    caption_cache: Optional[str] = None  # clap: folder of per-caption embeddings (default ~/.cache/fastm2d/captions)


@dataclass
class DataConfig:
    train: str = "synthetic"  # 'synthetic', a folder (searched recursively) or a CSV list of audio / .npy files
    root: Optional[str] = None  # base folder for relative paths in a CSV (default: the CSV's folder)
    sample_rate: int = 16000  # front end: 16000 or 32000 (docs/spec.md "Front end")
    norm_stats: Optional[List[float]] = None  # [mean, std]; None = computed once and saved in the run folder
    stats_items: int = 10000  # how many random crops the statistics are computed from
    min_epoch_items: int = 0  # repeat a small list up to this many items per epoch
    repeat_short: bool = False  # clips shorter than the crop: tiled (True) or zero-padded to the crop (frontend.py)
    on_bad_file: str = "skip"  # skip (count, log and list) | error
    # where the header checks of a list are kept and reused by every run on it (changed files checked again):
    # None = the user cache ($FASTM2D_CACHE or ~/.cache/fastm2d/file_checks), "run" = this run's folder only
    check_cache: Optional[str] = None
    num_workers: int = 2  # DataLoader processes (reference / store loaders) or DALI CPU threads
    loader: str = "reference"  # reference (folder / CSV / store, exact resume) | dali (raw audio, GPU spectrogram)
    # Streamed shards that other tools wrote (no fastm2d shards.json beside them): a webdataset shard index (wids
    # JSON, a path or URL) with each shard's sample count, or the samples every shard holds; neither: one listing
    # pass over the shards, cached per machine (data/shards/counts.py)
    shard_index: Optional[str] = None
    shard_samples: int = 0
    valid: Optional[str] = None  # held-out data (same forms as train): its M2D loss is monitored (train.eval_every)
    synthetic_clips: int = 512
    synthetic_seconds: float = 6.1
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass
class ProfileConfig:
    """torch.profiler over a few training steps (docs/performance.md "Profiling a run"); off by default and free."""
    # How many optimiser steps to profile (0 = off) from step `start` (after warm-up and compilation). Two integers,
    # not "10:3": YAML reads 10:3 as the base-60 number 603.
    steps: int = 0
    start: int = 5
    shapes: bool = False  # record each operator's input shapes
    stacks: bool = False  # record Python stacks (larger traces)
    memory: bool = True  # CUDA: a memory snapshot of the profiled steps (pytorch.org/memory_viz), peaks per phase
    top: int = 15  # operators printed by self time


@dataclass
class TrainConfig:
    batch_size: int = 64  # per optimiser micro-step, per process
    accum_steps: int = 1
    base_lr: float = 3e-4  # lr = base_lr * effective_batch / 256
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    epochs: float = 300.0
    warmup_epochs: float = 20.0
    max_steps: Optional[int] = None  # optimiser steps; overrides epochs
    clip_grad: float = 3.0
    ema_start: float = 0.99995
    ema_end: float = 0.99999
    precision: str = "auto"  # auto (bf16 on CUDA and on a CPU with fast bf16: fastm2d/devices.py) | fp32 | bf16 | fp16
    device: str = "auto"
    seed: int = 42
    log_every: int = 10
    save_every: int = 1000  # optimiser steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    compile: bool = False  # torch.compile the model's forward (fuses LayerNorm / GELU / residual / bias glue)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    # inductor (the fast one) | aot_eager | eager: the last two trace the same graphs without generating code
    # (debugging graph breaks; the device suite's CPU dry run, where Inductor's C++ builds take minutes)
    compile_backend: str = "inductor"
    peak_tflops: Optional[float] = None  # for MFU; default: the data-sheet bf16 peak of a known GPU
    engine: str = "auto"  # auto (DeepSpeed when launched with several processes) | single | deepspeed
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0, 1 or 2
    dist_timeout_s: int = 1800  # collective timeout: a dead rank makes the others fail, not hang
    init_from: Optional[str] = None  # start from these weights (ours or the original's, full or encoder-only)
    eval_every: int = 0  # optimiser steps between monitors (RankMe, explained variance, valid loss, probe); 0 = off
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class EvalConfig:
    """What the monitors during pre-training look at (train.eval_every)."""
    task: Optional[str] = None  # a small labelled task for a quick linear probe: 'synthetic', a CSV or a folder
    clips: int = 256  # fixed training crops for RankMe / explained variance (and valid crops)


@dataclass
class Config:
    out_dir: str = "runs/m2d"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _wrap(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{where}: bad config key {key!r}: {msg}" if key else f"{where}: {msg}")


def _merge(base, layer, where: str):
    """OmegaConf merge whose errors become a ConfigError naming the source and the key."""
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        raise _wrap(e, where) from None


def _yaml_error(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _read_yaml(path: Path):
    """The one place config files are parsed: YAML errors, duplicate keys, tags and a top level that is not a
    mapping are ConfigErrors naming the file (OmegaConf's loader is a safe loader: tags never construct objects)."""
    import yaml
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_error(e)})") from None
    except (OmegaConfBaseException, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: unreadable config ({_yaml_error(e)})") from None
    if not OmegaConf.is_dict(layer):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (model:, data:, train: ...), "
                          f"not a {type(OmegaConf.to_container(layer)).__name__}")
    return layer


def _overrides(items: Sequence[str]):
    import yaml
    layers = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            layers.append(OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: its value is not valid YAML ({_yaml_error(e)})") from None
        except OmegaConfBaseException as e:
            raise _wrap(e, f"override {item!r}") from None
    return OmegaConf.merge(*layers) if layers else OmegaConf.create({})


def settings_from(cls, options: dict, overrides: Sequence[str], command: str):
    """A command's own settings dataclass (fine-tuning, the linear probe): its defaults <- the command's options
    <- `key=value` overrides, with load_config's errors (an unknown key or a wrong type names the key)."""
    cfg = _merge(OmegaConf.structured(cls), OmegaConf.create(options), f"{command} options")
    cfg = _merge(cfg, _overrides(overrides), "command line")
    try:
        settings = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _wrap(e, "command line") from None
    # Every number of these settings is a rate, a count, a size or a width: finite and not negative.
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{command}: {f.name}={value}: expected a finite number >= 0")
    return settings


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `a.b=value` overrides. Returns a plain, validated `Config` object."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        cfg = _merge(cfg, _read_yaml(path), str(path))
    cfg = _merge(cfg, _overrides(overrides), "command line")
    try:  # interpolations (${...}) resolve here
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _wrap(e, "config") from None
    if config.model.lambda_off is None and config.offline.task in LAMBDA_OFF:
        config.model.lambda_off = LAMBDA_OFF[config.offline.task]
    config.model = config.model.resolved()
    check_config(config)
    return config


def check_config(c: Config) -> None:
    if c.data.sample_rate not in (16000, 32000):
        raise ConfigError(f"data.sample_rate={c.data.sample_rate}: expected 16000 or 32000")
    if c.data.loader not in ("reference", "dali"):
        raise ConfigError(f"data.loader={c.data.loader!r}: expected reference or dali")
    if c.data.loader == "dali" and c.data.train == "synthetic":
        raise ConfigError("data.loader=dali reads audio files: set data.train to a folder or CSV of audio files")
    if not 0.0 <= c.data.noise.eta < 1.0:
        raise ConfigError(f"data.noise.eta={c.data.noise.eta}: must lie in [0, 1) (1 would leave no clean signal; "
                          f"the paper uses 0.01 to 0.3)")
    if c.data.noise.eta > 0 and c.data.noise.train is None:
        raise ConfigError("data.noise.eta > 0 needs data.noise.train (the background-noise data)")
    if c.data.noise.train is not None and c.data.loader == "dali":
        raise ConfigError("background noise is mixed into reference / store loader batches; use data.loader=reference")
    if c.data.noise.direction not in ("noisy_m2d", "noisy_teacher"):
        raise ConfigError(f"data.noise.direction={c.data.noise.direction!r}: expected noisy_m2d or noisy_teacher")
    check_offline_config(c)
    if c.data.on_bad_file not in ("skip", "error"):
        raise ConfigError(f"data.on_bad_file={c.data.on_bad_file!r}: expected skip or error")
    if c.data.norm_stats is not None and (len(c.data.norm_stats) != 2 or c.data.norm_stats[1] <= 0):
        raise ConfigError(f"data.norm_stats={c.data.norm_stats}: expected [mean, std] with std > 0")
    if c.train.engine not in ENGINE_CHOICES:
        raise ConfigError(f"train.engine={c.train.engine!r}: expected {_expected(ENGINE_CHOICES)}")
    if c.train.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"train.zero_stage={c.train.zero_stage}: fastm2d supports ZeRO {_expected(ZERO_STAGES)} "
                          f"(stage 3 partitions the weights the EMA target update reads whole on every rank)")
    if c.train.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ConfigError(f"train.compile_mode={c.train.compile_mode!r}: not a torch.compile mode")
    if c.train.compile_backend not in COMPILE_BACKENDS:
        raise ConfigError(f"train.compile_backend={c.train.compile_backend!r}: choose one of {COMPILE_BACKENDS}")
    if c.train.precision not in PRECISION_CHOICES:
        raise ConfigError(f"train.precision={c.train.precision!r}: expected one of {PRECISION_CHOICES}")
    for key in ("steps", "start", "top"):
        if getattr(c.train.profile, key) < 0:
            raise ConfigError(f"train.profile.{key}={getattr(c.train.profile, key)}: must be >= 0")
    for key in ("batch_size", "accum_steps", "log_every", "save_every", "keep_checkpoints", "dist_timeout_s"):
        if getattr(c.train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(c.train, key)}: must be >= 1")
    for key in ("stats_items", "synthetic_clips"):
        if getattr(c.data, key) < 1:
            raise ConfigError(f"data.{key}={getattr(c.data, key)}: must be >= 1")
    for key in ("num_workers", "min_epoch_items", "shard_samples"):
        if getattr(c.data, key) < 0:
            raise ConfigError(f"data.{key}={getattr(c.data, key)}: must be >= 0 (num_workers=0: load in the main process)")
    if not c.data.synthetic_seconds > 0:
        raise ConfigError(f"data.synthetic_seconds={c.data.synthetic_seconds}: must be > 0")
    t = c.train
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas={t.betas}: expected two values in [0, 1), e.g. [0.9, 0.95]")
    numbers = (t.epochs, t.warmup_epochs, t.base_lr, t.weight_decay, t.clip_grad)
    if not (all(math.isfinite(v) for v in numbers) and t.epochs > 0 and t.warmup_epochs >= 0 and t.base_lr > 0
            and t.weight_decay >= 0 and t.clip_grad >= 0):
        raise ConfigError(f"train.epochs={t.epochs}, warmup_epochs={t.warmup_epochs}, base_lr={t.base_lr}, "
                          f"weight_decay={t.weight_decay}, clip_grad={t.clip_grad}: expected epochs > 0, base_lr > 0, "
                          f"the others >= 0")
    if not (0.0 <= t.ema_start <= 1.0 and 0.0 <= t.ema_end <= 1.0):
        raise ConfigError(f"train.ema_start={t.ema_start}, train.ema_end={t.ema_end}: EMA decays lie in [0, 1] "
                          f"(the paper: 0.99995 -> 0.99999)")
    if t.peak_tflops is not None and not t.peak_tflops > 0:
        raise ConfigError(f"train.peak_tflops={t.peak_tflops}: must be > 0")
    if t.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", t.device):
        raise ConfigError(f"train.device={t.device!r}: expected auto, cpu, cuda or cuda:N")
    check_out_dir(Path(c.out_dir))
    if c.train.eval_every < 0 or c.eval.clips < 2:
        raise ConfigError(f"train.eval_every={c.train.eval_every}, eval.clips={c.eval.clips}: expected >= 0 and >= 2")
    if c.train.max_steps is not None and c.train.max_steps < 1:
        raise ConfigError(f"train.max_steps={c.train.max_steps}: must be >= 1")


def is_shard_spec(spec) -> bool:
    """data.train spelled as streamed tar shards: a URL, a pipe: command, or a (brace-expanded) .tar path."""
    s = str(spec)
    return s.startswith(("http://", "https://", "pipe:")) or s.endswith(".tar") or ".tar}" in s or \
        (".tar" in s and "{" in s)


def check_out_dir(out: Path, setting: str = "out_dir") -> None:
    """A folder a command writes (out_dir, an --out folder) must be (or become) one: not a file, nor under one."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{setting}={out}: {p} is a file, not a folder" if p == out else
                                  f"{setting}={out}: {p} is a file, so no folder can be made under it")
            return


# model.lambda_off by offline.task when not set: the original's weight for that task. clap: --loss_off .01 (the
# original's clap/train_clap.py default and its M2D-CLAP runs); labels (M2D-AS) 1.0 and regularize 1.0, distill
# (M2D-S) 0.5: the paper's values (docs/spec.md; the original's train_audio.py / train_speech.py default to 0 and
# take the weight on the command line).
LAMBDA_OFF = {"none": 1.0, "labels": 1.0, "distill": 0.5, "regularize": 1.0, "clap": 0.01}


def check_offline_config(c: Config) -> None:
    o = c.offline
    if o.task not in OFFLINE_TASKS:
        raise ConfigError(f"offline.task={o.task!r}: expected {_expected(OFFLINE_TASKS)}")
    if o.task == "clap" and o.text_encoder is None and o.caption_embeddings is None:
        raise ConfigError("offline.task=clap needs offline.text_encoder (a local text model that encodes "
                          "offline.captions) or offline.caption_embeddings (a precomputed .npz; a text_encoder "
                          "given too is then only recorded, for zero-shot)")
    if o.task == "clap" and o.caption_embeddings is None and o.captions is None \
            and not str(c.data.train).lower().endswith(".csv"):
        raise ConfigError("offline.task=clap with a text encoder needs offline.captions (a CSV of file_name and "
                          "caption), or data.train set to such a CSV")
    if c.data.loader == "dali" and (o.task in ("labels", "clap") or (o.task == "distill" and o.features)):
        raise ConfigError(f"offline.task={o.task} reads a target per training file, which the DALI loader does not "
                          f"carry; use data.loader=reference")
    if o.text_pooling not in TEXT_POOLINGS:
        raise ConfigError(f"offline.text_pooling={o.text_pooling!r}: expected {_expected(TEXT_POOLINGS)}")
    if o.task == "labels" and o.labels is None and not str(c.data.train).lower().endswith(".csv") and \
            not is_shard_spec(c.data.train):  # streamed shards carry labels in each sample's JSON
        raise ConfigError("offline.task=labels needs offline.labels (a CSV of file_name and labels), or data.train "
                          "set to such a CSV")
    if o.task == "distill" and (o.teacher is None) == (o.features is None):
        raise ConfigError("offline.task=distill needs exactly one of offline.teacher (a checkpoint) and "
                          "offline.features (a folder of precomputed .npy features)")
    if o.task == "regularize" and o.teacher is None and c.train.init_from is None:
        raise ConfigError("offline.task=regularize needs train.init_from (the weights to start from and stay near) "
                          "or offline.teacher")
    if o.feature_rate <= 0:
        raise ConfigError(f"offline.feature_rate={o.feature_rate}: must be > 0 (Hz)")
    if c.data.noise.direction == "noisy_teacher" and o.task not in ("distill", "regularize"):
        raise ConfigError("data.noise.direction=noisy_teacher needs a teacher: offline.task=distill or regularize")


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved with a checkpoint (validated like a file; its values are data: see `as_data`)."""
    data = as_data(d, Config, "checkpoint config")
    config: Config = OmegaConf.to_object(_merge(OmegaConf.structured(Config), OmegaConf.create(data),
                                                "checkpoint config"))
    config.model = config.model.resolved()
    return config


def model_config_from_dict(d: dict) -> ModelConfig:
    """A model config read from a file (a checkpoint, a model folder's config.json), checked as data."""
    data = as_data(d, ModelConfig, "model config")
    return OmegaConf.to_object(_merge(OmegaConf.structured(ModelConfig), OmegaConf.create(data),
                                      "model config")).resolved()


def as_data(d, cls, where: str):
    """A configuration read from a file someone else wrote, made plain data before OmegaConf sees it: every value of
    the schema's type (a "4" where an integer belongs is refused naming the key, not converted: a file that
    mistypes one value may mistype others), and every `${...}` escaped, so nothing is interpolated (a downloaded
    checkpoint's `${oc.env:SECRET}` stays those characters, never the secret)."""
    import typing
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: a {type(d).__name__}, not a mapping")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in d.items():
        name = f"{where}: {key}"
        expected = hints.get(key)
        out[key] = _typed_value(value, expected, name) if expected is not None else _escaped(value)
    return out


def _escaped(value):
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v) for v in value]
    return value


def _typed_value(value, expected, name: str):
    import dataclasses
    import typing
    args = typing.get_args(expected)
    if typing.get_origin(expected) is typing.Union:  # Optional[X]
        if value is None:
            return None
        expected = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(expected):
        return as_data(value, expected, name.replace(": ", ".", 1) if ": " in name else name)
    origin = typing.get_origin(expected)
    ok = {int: lambda v: type(v) is int, float: lambda v: type(v) in (int, float), bool: lambda v: type(v) is bool,
          str: lambda v: isinstance(v, str)}
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r}: a {type(value).__name__}, expected a list")
        inner = typing.get_args(expected)
        return [_typed_value(v, inner[0], name) if inner else _escaped(v) for v in value]
    check = ok.get(expected)
    if check is not None and not check(value):
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[expected]
        raise ConfigError(f"{name}={value!r}: a {type(value).__name__}, expected {kind}")
    return _escaped(value)
