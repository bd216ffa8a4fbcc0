"""Configuration of the DiT + DTR recipe: YAML defaults, `key=value` overrides, validation, model shapes.

The keys mirror the paper code's Hydra config (byeongjun-park/DTR), so its command lines work here:

    torchrun --nproc_per_node=8 train.py general.data_path=<PATH> general.loss_weight_type=uw \
        models.name=DiT-L/2 models.routing.sharing_ratio=0.8

`configs/base_config.yaml` holds the values, `configs/data/<name>.yaml` (picked by `data=<name>`)
overrides them, and the command line overrides both. The `Config` dataclass below fixes which keys
exist, their types and, for string keys with fixed values, their choices; INT_RANGES and FLOAT_RANGES
bound every number. Anything wrong raises ConfigError, which the scripts turn into a one-line message
naming the key and exit code 2, before they write anything.
"""

import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import dtr
from dtr.validation import check_float, check_int
from models import DiT_models

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
PRETRAINED_VAES = ("ema", "mse")  # stabilityai/sd-vae-ft-ema, stabilityai/sd-vae-ft-mse
DIFFUSION_STEPS = 1000


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value; the message names the key."""


#################################################################################
#                 Schema: which keys exist, their types and choices             #
#################################################################################
# Values live in configs/*.yaml; a key missing from the schema is rejected wherever it comes from.


class Choice(str, Enum):
    """A string key with fixed values: OmegaConf rejects any other, naming the key and the choices.
    Members are plain strings to the code (== "digits", f-strings, os.path)."""

    __str__ = str.__str__
    __format__ = str.__format__


def choices(name, values):
    """A Choice whose members are `values` (each member's name is its value, as YAML spells it)."""
    return Choice(name, [(v, v) for v in values], module=__name__)


DataName = choices("DataName", ["ImageNet", "digits"])
Schedule = choices("Schedule", ["linear", "cosine"])
Device = choices("Device", ["auto", "cuda", "cpu"])
ModelName = choices("ModelName", DiT_models)
InitMethod = choices("InitMethod", ["DTR", "dtr", "random"])
TaskAxis = choices("TaskAxis", ["linear", "logsnr"])
Path = choices("Path", ["ddpm", "flow"])
# Each path's samplers; "auto" is the path's first: DDPM's ancestral sampler, SiT's default ODE solver.
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("dopri5", "euler", "heun2")}
Sampler = choices("Sampler", ["auto", *SAMPLERS["ddpm"], *SAMPLERS["flow"]])
Density = choices("Density", ["uniform", "logit_normal", "mode"])  # dtr.weighting's noise-level densities
MODE_SCALE_MAX = 2 / (math.pi - 2)  # SD3's mode map is a density for scales in [-1, 2 / (pi - 2)]


@dataclass
class General:
    data_path: str | None = MISSING
    latents_dir: str | None = MISSING
    path: Path = MISSING
    iterations: int = MISSING
    num_workers: int = MISSING
    global_batch_size: int = MISSING
    global_seed: int = MISSING
    gpu_offset: int = MISSING
    mixed_precision: bool = MISSING
    image_size: int = MISSING
    schedule_name: Schedule = MISSING
    loss_weight_type: str = MISSING
    vae: str = MISSING
    vae_config: str | None = MISSING
    uw_intervals: int = MISSING
    resume: str | None = MISSING
    fork: bool = MISSING
    compile: bool = MISSING
    grad_checkpoint: bool = MISSING
    device: Device = MISSING


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
    init_method: InitMethod = MISSING
    alpha: float = MISSING
    seed: int = MISSING
    task_axis: TaskAxis = MISSING


@dataclass
class Models:
    name: ModelName = MISSING
    hidden_size: int | None = MISSING
    depth: int | None = MISSING
    num_heads: int | None = MISSING
    class_dropout_prob: float = MISSING
    routing: Routing = field(default_factory=Routing)


@dataclass
class FlowKeys:
    density: Density = MISSING
    logit_mean: float = MISSING
    logit_std: float = MISSING
    mode_scale: float = MISSING
    shift: float = MISSING


@dataclass
class Data:
    name: DataName = MISSING
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
    ckpt: str | None = MISSING
    use_ema: bool = MISSING
    sampler: Sampler = MISSING
    atol: float = MISSING
    rtol: float = MISSING
    guide_channels: int | None = MISSING
    save_png: bool = MISSING
    class_labels: list[int] = MISSING
    grid: str | None = MISSING
    sample_batch: str | None = MISSING
    ref_batch: str | None = MISSING
    feature_extractor: str | None = MISSING
    feature_extractor_weights: str | None = MISSING
    metrics_file: str | None = MISSING


@dataclass
class Config:
    general: General = field(default_factory=General)
    optim: Optim = field(default_factory=Optim)
    models: Models = field(default_factory=Models)
    flow: FlowKeys = field(default_factory=FlowKeys)
    data: Data = field(default_factory=Data)
    logs: Logs = field(default_factory=Logs)
    eval: Eval = field(default_factory=Eval)


# The range of every number (dtr.validation's keywords); None, where the schema allows it, means "the default".
INT_RANGES = {
    "general.iterations": dict(minimum=1),
    "general.num_workers": dict(minimum=0),
    "general.global_batch_size": dict(minimum=1),
    "general.global_seed": {},
    "general.gpu_offset": dict(minimum=0),
    "general.image_size": dict(minimum=1),
    "general.uw_intervals": dict(minimum=1, maximum=DIFFUSION_STEPS),
    "models.hidden_size": dict(minimum=1),
    "models.depth": dict(minimum=1),
    "models.num_heads": dict(minimum=1),
    "models.routing.taskcount": dict(minimum=DIFFUSION_STEPS),  # one task per timestep at least
    "models.routing.seed": {},
    "data.num_classes": dict(minimum=1),
    "logs.log_every": dict(minimum=1),
    "logs.ckpt_every": dict(minimum=1),
    "eval.per_proc_batch_size": dict(minimum=1),
    "eval.num_fid_samples": dict(minimum=1),
    "eval.num_sampling_steps": dict(minimum=1, maximum=DIFFUSION_STEPS),
    "eval.ckpt_path.version": dict(minimum=0),
    "eval.ckpt_path.iterations": dict(minimum=0),
    "eval.guide_channels": dict(minimum=0),
}
FLOAT_RANGES = {  # finite, always
    "optim.lr": dict(low=0.0, low_open=True),
    "optim.weight_decay": dict(low=0.0),
    "optim.uw_lr": dict(low=0.0, low_open=True),
    "optim.ema_decay": dict(low=0.0, high=1.0, high_open=True),
    "models.class_dropout_prob": dict(low=0.0, high=1.0, high_open=True),
    "models.routing.sharing_ratio": dict(low=0.0, high=1.0, low_open=True, hint=" (1.0 = no routing, the baseline)"),
    "models.routing.alpha": dict(low=0.0, low_open=True),
    "eval.cfg_scale": dict(low=1.0, hint=" (1.0 = no guidance)"),
    "flow.logit_mean": {},
    "flow.logit_std": dict(low=0.0, low_open=True),
    "flow.mode_scale": dict(low=-1.0, high=MODE_SCALE_MAX),
    "flow.shift": dict(low=0.0, low_open=True, hint=" (1.0 = no shift)"),
    "eval.atol": dict(low=0.0, low_open=True),
    "eval.rtol": dict(low=0.0, low_open=True),
}


#################################################################################
#                                     Loading                                   #
#################################################################################


def data_presets():
    """Names accepted by `data=<name>`: the files in configs/data."""
    return sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(CONFIG_DIR, "data")) if f.endswith(".yaml"))


def load(argv=(), validate_values=True):
    """The config for command-line arguments like ["data=digits", "general.iterations=100"]."""
    preset, overrides = "ImageNet", []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value (e.g. general.loss_weight_type=uw)")
        key, value = arg.split("=", 1)
        if key.startswith(("+", "~")):
            raise ConfigError(
                f"argument {arg!r}: Hydra's +key / ~key syntax is not supported; set existing keys with key=value"
            )
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
        cfg = OmegaConf.merge(schema, *(OmegaConf.load(path) for path in files))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([arg for _, arg in overrides]))
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    if missing:
        raise ConfigError(f"{missing[0]} has no value: set it on the command line ({missing[0]}=...)")
    if cfg.eval.sampler == "auto":
        cfg.eval.sampler = Sampler(SAMPLERS[cfg.general.path][0])
    if validate_values:
        validate(cfg)
    return cfg


def _check_key(schema, key):
    node, path = schema, []
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():  # noqa: SIM118 (`in` skips MISSING keys)
            where = ".".join(path)
            valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
            guess = difflib.get_close_matches(part, valid, n=1)
            hint = f" (did you mean {'.'.join(path + guess)!r}?)" if guess else ""
            scope = f"under {where!r}" if where else "at the top level"
            extra = ", and data=<name>" if not where else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys {scope}: {', '.join(valid)}{extra}")
        node, path = node._get_node(part), path + [part]
    if isinstance(node, DictConfig):
        raise ConfigError(f"{key!r} is a group, not a value; set its keys: {', '.join(f'{key}.{k}' for k in node)}")


def _describe(e):
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{key}: {msg}" if key else msg


#################################################################################
#                                   Validation                                  #
#################################################################################


def validate(cfg):
    """Check every value (the schema has checked types and choices); raise ConfigError naming the first bad key."""
    for table, check in ((INT_RANGES, check_int), (FLOAT_RANGES, check_float)):
        for key, bounds in table.items():
            value = OmegaConf.select(cfg, key)
            if value is not None:
                try:
                    check(value, key, **bounds)
                except (TypeError, ValueError) as err:
                    raise ConfigError(str(err)) from None
    from dtr.weighting import parse_loss_weight_type

    try:
        parse_loss_weight_type(cfg.general.loss_weight_type)
    except ValueError as err:
        raise ConfigError(f"general.loss_weight_type: {err}") from None

    g, m, e = cfg.general, cfg.models, cfg.eval
    if e.sampler not in SAMPLERS[g.path]:
        other = "flow" if g.path == "ddpm" else "ddpm"
        raise ConfigError(
            f"eval.sampler={e.sampler} samples general.path={other}; with general.path={g.path} choose one of: "
            f"{', '.join(SAMPLERS[g.path])} (or auto)"
        )
    if g.path == "flow" and e.sampler in ("euler", "heun2") and e.num_sampling_steps < 2:
        raise ConfigError(
            f"eval.num_sampling_steps={e.num_sampling_steps}: {e.sampler} needs >= 2 (the points of SiT's time grid, "
            "both ends included)"
        )
    check_flow_keys(cfg)
    if m.routing.task_axis != "linear" and g.path != "flow":
        raise ConfigError(
            f"models.routing.task_axis={m.routing.task_axis} maps a flow noise level to a task: it needs "
            "general.path=flow (DDPM timesteps are tasks as they are)"
        )
    if g.path == "flow" and g.schedule_name != "linear":
        raise ConfigError(
            f"general.schedule_name={g.schedule_name} is a DDPM noise schedule: general.path=flow has none "
            "(SiT's linear interpolant); leave it at linear"
        )
    depth, hidden, heads, patch = architecture(cfg)
    if hidden % heads or hidden % 2:
        raise ConfigError(f"models.hidden_size={hidden} must be even and divisible by models.num_heads={heads}")
    if is_routed(cfg):
        try:
            dtr.active_channels(hidden, m.routing.sharing_ratio)
        except ValueError as err:
            raise ConfigError(f"models.routing.sharing_ratio with models.hidden_size={hidden}: {err}") from None
    if cfg.data.name == "digits":
        if g.image_size != 8:
            raise ConfigError(f"general.image_size must be 8 for data=digits (8x8 images), got {g.image_size}")
    else:
        if g.vae not in PRETRAINED_VAES and not os.path.isdir(g.vae):
            raise ConfigError(
                f"general.vae={g.vae!r} is not valid; choose one of: ema, mse, or a local AutoencoderKL folder"
            )
        if g.vae_config is not None and not os.path.isfile(g.vae_config):
            raise ConfigError(f"general.vae_config: no such file {g.vae_config!r}")
        factor = vae_geometry(cfg)[1]
        if g.image_size < factor or g.image_size % factor:
            raise ConfigError(
                f"general.image_size must be a multiple of the VAE's downsampling factor {factor}, got {g.image_size}"
            )
    size = input_size(cfg)
    if size % patch:
        raise ConfigError(
            f"models.name={m.name}: patch size {patch} does not divide the model input size {size} "
            f"(general.image_size={g.image_size})"
        )


# The flow group's defaults (SiT's uniform density; SD3's logit-normal and mode parameters), and whose each is.
FLOW_DEFAULTS = {"density": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "shift": 1.0}
DENSITY_KEYS = {"logit_mean": "logit_normal", "logit_std": "logit_normal", "mode_scale": "mode"}


def check_flow_keys(cfg):
    """The flow group applies to general.path=flow, and each density parameter to its own density."""
    f = cfg.flow
    if cfg.general.path != "flow":
        changed = [f"flow.{k}={f[k]}" for k, v in FLOW_DEFAULTS.items() if f[k] != v]
        if changed:
            raise ConfigError(f"{changed[0]} applies to general.path=flow (the flow's noise-level density)")
    for key, density in DENSITY_KEYS.items():
        if f[key] != FLOW_DEFAULTS[key] and f.density != density:
            raise ConfigError(f"flow.{key} applies to flow.density={density}, not flow.density={f.density}")


def flow_density(cfg):
    """diffusion.create_flow's density keywords: the density, its own parameters and the shift."""
    f = cfg.flow
    return dict(
        density=str(f.density),
        shift=f.shift,
        **{key: f[key] for key, density in DENSITY_KEYS.items() if density == f.density},
    )


#################################################################################
#                          Model and data shapes from the config                #
#################################################################################


def architecture(cfg):
    """(depth, hidden_size, num_heads, patch_size) of models.name (models.DiT_models) with its overrides."""
    m = cfg.models
    size = dict(DiT_models[m.name].keywords)
    size.update({key: m[key] for key in ("depth", "hidden_size", "num_heads") if m[key] is not None})
    return size["depth"], size["hidden_size"], size["num_heads"], size["patch_size"]


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


def model_string(cfg):
    """DiT-XL/2 -> DiT-XL-2, for folder names."""
    return cfg.models.name.replace("/", "-")


def routing_method(cfg):
    """dtr.wrap's method for models.routing.init_method ("DTR" -> "dtr")."""
    return "random" if cfg.models.routing.init_method == "random" else "dtr"


def is_flow(cfg):
    """general.path=flow: SiT's linear interpolant with velocity prediction (diffusion/flow.py)."""
    return cfg.general.path == "flow"


def is_routed(cfg):
    """sharing_ratio = 1.0 is the baseline: the model is not wrapped at all."""
    return cfg.models.routing.sharing_ratio < 1.0


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
    """Plain dict of plain values (for checkpoints: loadable with torch.load(weights_only=True))."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
