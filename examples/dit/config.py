"""Configuration of the DiT + DTR recipe: YAML defaults, `key=value` overrides, validation, derived paths.

The keys mirror the paper code's Hydra config (byeongjun-park/DTR), so its command lines work here:

    torchrun --nproc_per_node=8 train.py general.data_path=<PATH> general.loss_weight_type=uw \
        models.name=DiT-L/2 models.routing.sharing_ratio=0.8

`configs/base_config.yaml` holds the values, `configs/data/<name>.yaml` (picked by `data=<name>`)
overrides them, and the command line overrides both. SCHEMA below fixes which keys exist and their
types; `validate` checks the values. Anything wrong raises ConfigError, which the scripts turn into
a one-line message naming the key and exit code 2.
"""

import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from glob import glob
from typing import List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(HERE, "configs")


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value; the message names the key."""


#################################################################################
#                     Schema: which keys exist, and their types                 #
#################################################################################
# Values live in configs/*.yaml; a key missing from the schema is rejected wherever it comes from.


@dataclass
class General:
    data_path: Optional[str] = MISSING
    latents_dir: Optional[str] = MISSING
    iterations: int = MISSING
    num_workers: int = MISSING
    global_batch_size: int = MISSING
    global_seed: int = MISSING
    gpu_offset: int = MISSING
    mixed_precision: bool = MISSING
    image_size: int = MISSING
    schedule_name: str = MISSING
    loss_weight_type: str = MISSING
    vae: str = MISSING
    vae_config: Optional[str] = MISSING
    uw_intervals: int = MISSING
    resume: Optional[str] = MISSING
    compile: bool = MISSING
    grad_checkpoint: bool = MISSING
    device: str = MISSING


@dataclass
class Optim:
    lr: float = MISSING
    weight_decay: float = MISSING
    uw_lr: float = MISSING
    ema_decay: float = MISSING


@dataclass
class Routing:
    sharing_ratio: float = MISSING
    taskcount: int = MISSING
    init_method: str = MISSING
    alpha: float = MISSING
    seed: int = MISSING


@dataclass
class Models:
    name: str = MISSING
    hidden_size: Optional[int] = MISSING
    depth: Optional[int] = MISSING
    num_heads: Optional[int] = MISSING
    class_dropout_prob: float = MISSING
    routing: Routing = field(default_factory=Routing)


@dataclass
class Data:
    name: str = MISSING
    num_classes: int = MISSING


@dataclass
class Logs:
    log_every: int = MISSING
    ckpt_every: int = MISSING
    results_dir: str = MISSING
    project_name: str = MISSING
    tensorboard: bool = MISSING


@dataclass
class CkptPath:
    version: int = MISSING
    iterations: int = MISSING


@dataclass
class Eval:
    samples_dir: str = MISSING
    per_proc_batch_size: int = MISSING
    num_fid_samples: int = MISSING
    cfg_scale: float = MISSING
    num_sampling_steps: int = MISSING
    ckpt_path: CkptPath = field(default_factory=CkptPath)
    ckpt: Optional[str] = MISSING
    use_ema: bool = MISSING
    sampler: str = MISSING
    guide_channels: Optional[int] = MISSING
    save_png: bool = MISSING
    class_labels: List[int] = MISSING
    grid: Optional[str] = MISSING
    sample_batch: Optional[str] = MISSING
    ref_batch: Optional[str] = MISSING
    feature_extractor: Optional[str] = MISSING
    feature_extractor_weights: Optional[str] = MISSING
    metrics_file: Optional[str] = MISSING


@dataclass
class Config:
    general: General = field(default_factory=General)
    optim: Optim = field(default_factory=Optim)
    models: Models = field(default_factory=Models)
    data: Data = field(default_factory=Data)
    logs: Logs = field(default_factory=Logs)
    eval: Eval = field(default_factory=Eval)


# DiT sizes (depth, hidden_size, num_heads), as facebookresearch/DiT's models.py; "T" is a toy size.
ARCHS = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (4, 64, 4)}
MODEL_NAMES = [f"DiT-{size}/{p}" for size in ("XL", "L", "B", "S") for p in (2, 4, 8)] + ["DiT-T/1", "DiT-T/2", "DiT-T/4"]

CHOICES = {
    "data.name": ("ImageNet", "digits"),
    "general.schedule_name": ("linear", "cosine"),
    "general.device": ("auto", "cuda", "cpu"),
    "models.name": tuple(MODEL_NAMES),
    "models.routing.init_method": ("DTR", "dtr", "random"),
    "eval.sampler": ("ddpm", "ddim"),
}
PRETRAINED_VAES = ("ema", "mse")  # stabilityai/sd-vae-ft-ema, stabilityai/sd-vae-ft-mse
DIFFUSION_STEPS = 1000


#################################################################################
#                                     Loading                                   #
#################################################################################


def data_presets():
    """Names accepted by `data=<name>`: the files in configs/data."""
    return sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(CONFIG_DIR, "data")) if f.endswith(".yaml"))


def load(argv=(), validate_values=True):
    """The config for command-line arguments like ["data=digits", "general.iterations=100"]."""
    argv = list(argv)
    preset = "ImageNet"
    overrides = []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value (e.g. general.loss_weight_type=uw)")
        key, value = arg.split("=", 1)
        if key.startswith(("+", "~")):
            raise ConfigError(f"argument {arg!r}: Hydra's +key / ~key syntax is not supported; set existing keys with key=value")
        if key == "data":
            if value not in data_presets():
                raise ConfigError(f"data={value!r} is not a data set; valid choices: {', '.join(data_presets())}")
            preset = value
        else:
            overrides.append((key, arg))

    schema = OmegaConf.structured(Config)
    for key, _ in overrides:
        _check_key(schema, key)
    files = [os.path.join(CONFIG_DIR, "base_config.yaml"), os.path.join(CONFIG_DIR, "data", f"{preset}.yaml")]
    try:
        cfg = schema
        for path in files:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([arg for _, arg in overrides]))
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    if missing:
        raise ConfigError(f"{missing[0]} has no value: set it on the command line ({missing[0]}=...)")
    if validate_values:
        validate(cfg)
    return cfg


def _check_key(schema, key):
    node, path = schema, []
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            where = ".".join(path)
            valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
            guess = difflib.get_close_matches(part, valid, n=1)
            hint = f" (did you mean {'.'.join(path + guess)!r}?)" if guess else ""
            scope = f"under {where!r}" if where else "at the top level"
            extra = ", and data=<name>" if not where else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys {scope}: {', '.join(valid)}{extra}")
        node, path = node._get_node(part), path + [part]
    if isinstance(node, DictConfig):
        raise ConfigError(f"{key!r} is a group, not a value; set its keys: {', '.join(f'{key}.{k}' for k in node.keys())}")


def _describe(e):
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{key}: {msg}" if key else msg


#################################################################################
#                                   Validation                                  #
#################################################################################


def validate(cfg):
    """Check every value; raise ConfigError naming the first bad key and what it accepts."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")

    g, o, m, r, e = cfg.general, cfg.optim, cfg.models, cfg.models.routing, cfg.eval
    from dtr.weighting import parse_loss_weight_type

    try:
        parse_loss_weight_type(g.loss_weight_type)
    except ValueError as err:
        raise ConfigError(f"general.loss_weight_type: {err}") from None

    _at_least(cfg, "general.iterations", 1)
    _at_least(cfg, "general.num_workers", 0)
    _at_least(cfg, "general.global_batch_size", 1)
    _at_least(cfg, "general.gpu_offset", 0)
    _at_least(cfg, "general.uw_intervals", 1)
    _at_least(cfg, "data.num_classes", 1)
    _at_least(cfg, "logs.log_every", 1)
    _at_least(cfg, "logs.ckpt_every", 1)
    _at_least(cfg, "eval.per_proc_batch_size", 1)
    _at_least(cfg, "eval.num_fid_samples", 1)
    _at_least(cfg, "eval.ckpt_path.version", 0)
    _at_least(cfg, "eval.ckpt_path.iterations", 0)
    for key in ("models.hidden_size", "models.depth", "models.num_heads"):
        if OmegaConf.select(cfg, key) is not None:
            _at_least(cfg, key, 1)
    if g.uw_intervals > DIFFUSION_STEPS:
        raise ConfigError(f"general.uw_intervals must be <= {DIFFUSION_STEPS}, got {g.uw_intervals}")
    if not 1 <= e.num_sampling_steps <= DIFFUSION_STEPS:
        raise ConfigError(f"eval.num_sampling_steps must be in [1, {DIFFUSION_STEPS}], got {e.num_sampling_steps}")
    if not 0.0 < r.sharing_ratio <= 1.0:
        raise ConfigError(f"models.routing.sharing_ratio must be in (0, 1] (1.0 = no routing, the baseline), got {r.sharing_ratio}")
    if not r.alpha > 0:
        raise ConfigError(f"models.routing.alpha must be > 0, got {r.alpha}")
    if r.taskcount < DIFFUSION_STEPS:
        raise ConfigError(f"models.routing.taskcount must be >= the {DIFFUSION_STEPS} diffusion steps (one task per timestep), got {r.taskcount}")
    if not o.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if not o.uw_lr > 0:
        raise ConfigError(f"optim.uw_lr must be > 0, got {o.uw_lr}")
    if not o.weight_decay >= 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if not 0.0 <= o.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
    if not 0.0 <= m.class_dropout_prob < 1.0:
        raise ConfigError(f"models.class_dropout_prob must be in [0, 1), got {m.class_dropout_prob}")
    if e.cfg_scale < 1.0:
        raise ConfigError(f"eval.cfg_scale must be >= 1.0 (1.0 = no guidance), got {e.cfg_scale}")

    depth, hidden, heads, patch = architecture(cfg)
    if hidden % heads or hidden % 2:
        raise ConfigError(f"models.hidden_size={hidden} must be even and divisible by models.num_heads={heads}")
    if cfg.data.name == "digits":
        if g.image_size != 8:
            raise ConfigError(f"general.image_size must be 8 for data=digits (8x8 images), got {g.image_size}")
    else:
        if g.vae not in PRETRAINED_VAES and not os.path.isdir(g.vae):
            raise ConfigError(f"general.vae={g.vae!r} is not valid; choose one of: ema, mse, or a local AutoencoderKL folder")
        if g.vae_config is not None and not os.path.isfile(g.vae_config):
            raise ConfigError(f"general.vae_config: no such file {g.vae_config!r}")
        factor = vae_geometry(cfg)[1]
        if g.image_size < factor or g.image_size % factor:
            raise ConfigError(f"general.image_size must be a multiple of the VAE's downsampling factor {factor}, got {g.image_size}")
    size = input_size(cfg)
    if size % patch:
        raise ConfigError(f"models.name={m.name}: patch size {patch} does not divide the model input size {size} (general.image_size={g.image_size})")


def _at_least(cfg, key, low):
    value = OmegaConf.select(cfg, key)
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


#################################################################################
#                          Model and data shapes from the config                #
#################################################################################


def architecture(cfg):
    """(depth, hidden_size, num_heads, patch_size) of models.name with its overrides."""
    size, patch = cfg.models.name[len("DiT-"):].split("/")
    depth, hidden, heads = ARCHS[size]
    m = cfg.models
    return (m.depth or depth, m.hidden_size or hidden, m.num_heads or heads, int(patch))


def vae_geometry(cfg):
    """(latent_channels, downsampling factor) of the configured VAE, read from its config (no weights)."""
    g = cfg.general
    if g.vae_config is not None:
        path = g.vae_config
    elif g.vae in PRETRAINED_VAES:
        return 4, 8  # stabilityai/sd-vae-ft-{ema,mse}
    else:
        path = os.path.join(g.vae, "config.json")
    try:
        with open(path) as f:
            vae = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"general.vae_config / general.vae: cannot read the VAE config {path!r}: {err}") from None
    return vae.get("latent_channels", 4), 2 ** (len(vae.get("block_out_channels", [64])) - 1)


def in_channels(cfg):
    """Channels the DiT sees: 1 for digits (pixel space), the VAE's latent channels otherwise."""
    return 1 if cfg.data.name == "digits" else vae_geometry(cfg)[0]


def input_size(cfg):
    """Spatial size the DiT sees: the image for digits, the VAE latent otherwise."""
    return cfg.general.image_size if cfg.data.name == "digits" else cfg.general.image_size // vae_geometry(cfg)[1]


def routing_method(cfg):
    """dtr.wrap's method for models.routing.init_method ("DTR" -> "dtr")."""
    return "random" if cfg.models.routing.init_method == "random" else "dtr"


def is_routed(cfg):
    """sharing_ratio = 1.0 is the baseline: the model is not wrapped at all."""
    return cfg.models.routing.sharing_ratio < 1.0


#################################################################################
#                     Derived folders (as the paper code derives them)          #
#################################################################################


def model_string(cfg):
    """DiT-XL/2 -> DiT-XL-2, for folder names."""
    return cfg.models.name.replace("/", "-")


def new_experiment_dir(cfg):
    """{results_dir}/{model}/{index:03d}, the next free index (000, 001, ...)."""
    root = os.path.join(cfg.logs.results_dir, model_string(cfg))
    index = len(glob(os.path.join(root, "[0-9][0-9][0-9]")))
    return os.path.join(root, f"{index:03d}")


def checkpoint_path(cfg):
    """eval.ckpt if set, else {results_dir}/{model}/{eval.ckpt_path.version:03d}/checkpoints/{iterations:07d}.pt."""
    if cfg.eval.ckpt is not None:
        return cfg.eval.ckpt
    v, it = cfg.eval.ckpt_path.version, cfg.eval.ckpt_path.iterations
    return os.path.join(cfg.logs.results_dir, model_string(cfg), f"{v:03d}", "checkpoints", f"{it:07d}.pt")


def sample_folder(cfg):
    """{samples_dir}/{model}/{ckpt}-size-{S}-vae-{vae}-samples-{N}-cfg-{scale}-seed-{seed}; the .npz goes beside it."""
    e, g = cfg.eval, cfg.general
    ckpt = os.path.splitext(os.path.basename(e.ckpt))[0] if e.ckpt is not None else f"{e.ckpt_path.iterations:07d}"
    vae = "none" if cfg.data.name == "digits" else os.path.basename(os.path.normpath(g.vae))
    name = f"{ckpt}-size-{g.image_size}-vae-{vae}-samples-{e.num_fid_samples}"
    if cfg.data.num_classes > 1:
        name += f"-cfg-{e.cfg_scale}"
    name += f"-seed-{g.global_seed}"
    return os.path.join(e.samples_dir, model_string(cfg), name)


def latents_dir(cfg):
    """extract_latents.py's output: general.latents_dir, else <data_path>-latents-<image_size>-<vae>."""
    if cfg.general.latents_dir is not None:
        return cfg.general.latents_dir
    vae = os.path.basename(os.path.normpath(cfg.general.vae))
    return f"{os.path.normpath(cfg.general.data_path)}-latents-{cfg.general.image_size}-{vae}"


def sample_batch_path(cfg):
    """evaluate.py's samples: eval.sample_batch, else sample_ddp.py's .npz."""
    return cfg.eval.sample_batch if cfg.eval.sample_batch is not None else sample_folder(cfg) + ".npz"


#################################################################################
#                                  Entry points                                 #
#################################################################################


def from_cli(argv=None):
    """Parse sys.argv for a script: prints the defaults on --help; exits 2 with the message on ConfigError."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        script = os.path.basename(sys.argv[0])
        print(f"usage: {script} [data=ImageNet|digits] [key=value ...]\n\ndefaults (configs/base_config.yaml):\n")
        print(OmegaConf.to_yaml(load([], validate_values=False)))
        sys.exit(0)
    try:
        return load(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


def run(main, argv=None):
    """A script's entry point: parse the command line, run main(cfg); a ConfigError exits 2 with its message."""
    cfg = from_cli(argv)
    try:
        return main(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


def to_yaml(cfg):
    return OmegaConf.to_yaml(cfg)


def to_container(cfg):
    """Plain dict (for checkpoints: loadable with torch.load(weights_only=True))."""
    return OmegaConf.to_container(cfg, resolve=True)



