"""A training run of the recipe: its folder, its checkpoints, and how it resumes.

A run lives in `{logs.results_dir}/{model}/{NNN}/`: `log.txt`, `config.yaml` (plus `config-{step}.yaml` for each
resumed segment) and `checkpoints/{step:07d}.pt`. A checkpoint is one dict,
`{model, ema, opt, uw, config, step, rng, digest}`, written to a temporary file and renamed; `digest` holds the
SHA-256 of every other entry, so that a file changed on disk or in a copy is refused wherever it is loaded
(resume, sampling) instead of training on, or sampling from, corrupted weights.

A run never writes into another run's folder and never rewrites one of its files. `general.resume=<last
checkpoint>` continues a run exactly, in its folder; `general.fork=true` continues any checkpoint in a new one.
"""

import hashlib
import os
import re
import warnings

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import config

# The flow's training density (general.path=flow); with ANT-UW its intervals, hence the UW state, depend on it.
FLOW_DENSITY_KEYS = tuple(f"flow.{key}" for key in config.FLOW_DEFAULTS)
# Keys a checkpoint's weights depend on: sampling or resuming with other values cannot use them.
MODEL_KEYS = (
    "general.path",
    "data.name",
    "data.num_classes",
    "general.image_size",
    "models.name",
    "models.hidden_size",
    "models.depth",
    "models.num_heads",
    "models.routing.sharing_ratio",
    "models.routing.taskcount",
    "models.routing.init_method",
    "models.routing.alpha",
    "models.routing.seed",
    "models.routing.task_axis",
)
# The optimizer and UW state depend on the loss weighting too: a resume, even a fork, must keep these.
STATE_KEYS = (*MODEL_KEYS, "general.loss_weight_type")
# Keys an exact continuation depends on: changing them on resume needs general.fork=true.
RUN_KEYS = (
    "general.global_seed",
    "general.global_batch_size",
    "general.data_path",
    "general.vae",
    "general.vae_config",
    "general.schedule_name",
    "general.mixed_precision",
    "models.class_dropout_prob",
    *FLOW_DENSITY_KEYS,
)
# Keys that take effect from the resumed step on (set on the optimizer, read by the EMA each step), and are logged.
APPLIED_KEYS = ("optim.lr", "optim.weight_decay", "optim.uw_lr", "optim.ema_decay")
# The value a key had before the recipe had it: what a checkpoint written then, without the key, was made with.
LEGACY_VALUES = {
    "general.path": "ddpm",
    "models.routing.task_axis": "linear",
    **{f"flow.{k}": v for k, v in config.FLOW_DEFAULTS.items()},
}
# What a train.py checkpoint holds, besides its digest (older checkpoints have none).
CONTENTS = ("model", "ema", "opt", "uw", "config", "step", "rng")


#################################################################################
#                        Comparing a saved config with cfg                      #
#################################################################################


def changed_keys(saved, cfg, keys):
    """[(key, saved value, value in cfg)] for each of `keys` whose values differ (init_method ignores case)."""
    saved = OmegaConf.create(saved)
    out = []
    for key in keys:
        theirs, ours = OmegaConf.select(saved, key, default=LEGACY_VALUES.get(key)), OmegaConf.select(cfg, key)
        if key == "models.routing.init_method" and theirs is not None:  # DTR and dtr are the same method
            same = theirs.lower() == ours.lower()
        else:
            same = theirs == ours
        if not same:
            out.append((key, theirs, ours))
    return out


def check_same_model(cfg, saved, path, keys=MODEL_KEYS):
    """Fail if the checkpoint at `path` was trained with other model or routing keys than cfg asks for."""
    if not config.is_routed(cfg):  # routing details do not matter for the baseline; the sharing ratio does
        keys = [k for k in keys if not k.startswith("models.routing.") or k == "models.routing.sharing_ratio"]
    diffs = changed_keys(saved, cfg, keys)
    if diffs:
        trained = " ".join(f"{key}={theirs}" for key, theirs, _ in diffs)
        raise config.ConfigError(
            f"{path} was trained with {trained}; pass the same keys (or eval.ckpt= a matching checkpoint)"
        )


#################################################################################
#                                Experiment folders                             #
#################################################################################


def experiment_root(cfg):
    """{logs.results_dir}/{model}: where a model's numbered experiment folders live."""
    return os.path.join(cfg.logs.results_dir, config.model_string(cfg))


def new_experiment_dir(root):
    """{root}/{index:03d}, one after the highest existing index (a gap is never filled)."""
    names = os.listdir(root) if os.path.isdir(root) else []
    taken = [int(name) for name in names if re.fullmatch(r"\d{3,}", name)]
    return os.path.join(root, f"{max(taken, default=-1) + 1:03d}")


def claim_experiment_dir(root):
    """Create the next experiment folder under root; a run starting at the same moment gets the one after."""
    while True:
        path = new_experiment_dir(root)
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue


def write_once(path, text):
    """Write text to path, or to path-2, path-3, ... (before the extension): a run's files are never rewritten."""
    stem, ext = os.path.splitext(path)
    for n in range(1, 10_000):
        target = path if n == 1 else f"{stem}-{n}{ext}"
        try:
            with open(target, "x") as f:
                f.write(text)
            return target
        except FileExistsError:
            continue
    raise RuntimeError(f"{path}: 10,000 versions exist already")


def open_experiment(cfg, run_dir, step, rank):
    """(experiment folder, this segment's config file): `run_dir` when continuing a run, else a new folder.

    Rank 0 claims the folder and writes the config (config.yaml in a new folder, config-{step}.yaml for a
    resumed segment); every rank gets the same folder. The config file is None on other ranks.
    """
    experiment_dir = run_dir
    if experiment_dir is None:
        experiment_dir = claim_experiment_dir(experiment_root(cfg)) if rank == 0 else None
        if dist.is_initialized():  # every rank agrees on rank 0's folder
            holder = [experiment_dir]
            dist.broadcast_object_list(holder, src=0)
            experiment_dir = holder[0]
    config_file = None
    if rank == 0:
        os.makedirs(os.path.join(experiment_dir, "checkpoints"), exist_ok=True)
        name = "config.yaml" if run_dir is None else f"config-{step:07d}.yaml"
        config_file = write_once(os.path.join(experiment_dir, name), config.to_yaml(cfg))
    if dist.is_initialized():
        dist.barrier()
    return experiment_dir, config_file


#################################################################################
#                                   Checkpoints                                 #
#################################################################################


def checkpoint_file(folder, step):
    return os.path.join(folder, f"{step:07d}.pt")


def checkpoints_in(folder):
    """{step: path} of the checkpoints train.py wrote in folder (a half-written .tmp is not one)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return {int(n[:-3]): os.path.join(folder, n) for n in names if re.fullmatch(r"\d{7,}\.pt", n)}


def checkpoint_path(cfg):
    """eval.ckpt if set, else {results_dir}/{model}/{eval.ckpt_path.version:03d}/checkpoints/{iterations:07d}.pt."""
    if cfg.eval.ckpt is not None:
        return cfg.eval.ckpt
    run = os.path.join(experiment_root(cfg), f"{cfg.eval.ckpt_path.version:03d}")
    return checkpoint_file(os.path.join(run, "checkpoints"), cfg.eval.ckpt_path.iterations)


def _feed(h, value, name):
    """Hash value into h: tensors byte for byte (with dtype and shape), containers in order, anything else by repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _feed(h, value[key], f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _feed(h, item, f"{name}[{i}]")
    else:
        h.update(f"{name}={value!r};".encode())


def digest(checkpoint):
    """{entry: SHA-256} of every entry of a checkpoint dict but `digest` itself."""
    out = {}
    for key, value in checkpoint.items():
        if key != "digest":
            h = hashlib.sha256()
            _feed(h, value, key)
            out[key] = h.hexdigest()
    return out


def save_checkpoint(path, *, model, ema, opt, uw, cfg, step, rng):
    """Write the one checkpoint dict, with its digest, to a temporary file, then rename: a crash never leaves half
    a checkpoint. An existing checkpoint is never replaced (it would belong to another run writing here)."""
    if os.path.exists(path):
        raise RuntimeError(f"{path} exists: another run is writing into {os.path.dirname(os.path.dirname(path))}")
    checkpoint = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "uw": uw.state_dict() if uw is not None else None,
        "config": config.to_container(cfg),
        "step": step,
        "rng": rng,
    }
    checkpoint["digest"] = digest(checkpoint)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def verify(checkpoint, path):
    """Refuse a checkpoint whose entries differ from its digest (ConfigError naming the file and the entries).

    Returns a note for a checkpoint written without a digest (older train.py, a bare state dict), else None.
    """
    saved = checkpoint.get("digest")
    if saved is None:
        return f"{path} has no digest (written before checkpoints carried one): loaded without an integrity check"
    actual = digest(checkpoint)
    saved = saved if isinstance(saved, dict) else {}
    bad = sorted(k for k in actual.keys() | saved.keys() if saved.get(k) != actual.get(k))
    if bad:
        raise config.ConfigError(
            f"{path} is corrupt: the digest written with it does not match its {', '.join(bad)} (the file changed "
            "on disk or in a copy); use an intact copy or an earlier checkpoint"
        )
    return None


def load_checkpoint(path, mmap=False):
    """(checkpoint, note): a recipe checkpoint (or a plain state dict, such as DiT's released ones), weights only,
    verified against its digest; note says when there was no digest to verify (else None).

    mmap=True maps the file instead of reading it (for weights that are copied into a model anyway). A missing,
    unreadable (truncated, empty), foreign or corrupt file raises a one-line ConfigError naming it.
    """
    if not os.path.isfile(path):
        raise config.ConfigError(
            f"no checkpoint at {path}: train first with the same keys, or set eval.ckpt=<path> "
            "(or eval.ckpt_path.version / eval.ckpt_path.iterations; general.resume for train.py)"
        )
    try:
        with warnings.catch_warnings():
            # torch < 2.4 warns about its own TypedStorage while loading: not the user's business
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # an old (non-zip) file
    except Exception as err:  # torch.load raises many types: RuntimeError, EOFError, UnpicklingError, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "the file ends early"
        raise config.ConfigError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {reason}); expected a file written by "
            "train.py (or a DiT state dict) with torch.save"
        ) from None
    if not isinstance(checkpoint, dict):
        raise config.ConfigError(
            f"{path} holds a {type(checkpoint).__name__}, not a checkpoint; expected a dict written by train.py "
            "(or a DiT state dict)"
        )
    return checkpoint, verify(checkpoint, path)


#################################################################################
#                                    Resuming                                   #
#################################################################################


def check_resume(cfg, checkpoint, path):
    """Refuse a resume that would overwrite or silently change a run; returns the run folder, or None to fork.

    Always refused: a file that is not a train.py checkpoint, other STATE_KEYS (the state would not load).
    Refused unless general.fork=true: other RUN_KEYS, a checkpoint outside a run's checkpoints/ folder, a
    checkpoint that is not its run's last (resuming would overwrite the later ones).
    """
    missing = [k for k in CONTENTS if k not in checkpoint]
    if missing:
        raise config.ConfigError(
            f"general.resume={path} is not a train.py checkpoint: it has no {', '.join(missing)} (expected "
            f"{', '.join(CONTENTS)}; a bare DiT state dict has no optimizer state to resume)"
        )
    uw = ("general.uw_intervals", *FLOW_DENSITY_KEYS) if cfg.general.loss_weight_type == "uw" else ()
    check_same_model(cfg, checkpoint["config"], path, keys=STATE_KEYS + uw)
    if cfg.general.fork:
        return None
    fork = f"or add general.fork=true to continue from {path} in a new experiment folder"
    changed = [f"{k}={theirs} (now {ours})" for k, theirs, ours in changed_keys(checkpoint["config"], cfg, RUN_KEYS)]
    if changed:
        raise config.ConfigError(
            f"{path} was trained with {', '.join(changed)}: the run would not continue exactly; pass its values, {fork}"
        )
    folder = os.path.abspath(os.path.dirname(path) or ".")
    run_dir = os.path.dirname(folder)
    if os.path.basename(folder) != "checkpoints" or not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise config.ConfigError(
            f"general.resume={path} is not in a run's checkpoints/ folder (<run>/checkpoints/, beside "
            f"<run>/config.yaml), so there is no run to continue; {fork}"
        )
    later = [p for step, p in sorted(checkpoints_in(folder).items()) if step > checkpoint["step"]]
    if later:
        names = ", ".join(os.path.basename(p) for p in later[:3])
        if len(later) > 3:
            names += f" and {len(later) - 3} more"
        raise config.ConfigError(
            f"general.resume={path} is not the last checkpoint of its run: continuing would overwrite the later "
            f"{names}; resume from {later[-1]}, {fork}"
        )
    return os.path.dirname(os.path.dirname(os.path.normpath(path))) or "."


def prepare_resume(cfg):
    """(checkpoint, run folder, notes) for general.resume: the verified checkpoint, the run it continues (None for
    a fork: a new folder), and what the log should say. (None, None, []) for a fresh run. Refuses what
    check_resume refuses, and general.fork without general.resume."""
    g = cfg.general
    if g.resume is None:
        if g.fork:
            raise config.ConfigError("general.fork=true needs general.resume=<checkpoint>: the checkpoint to fork from")
        return None, None, []
    checkpoint, note = load_checkpoint(g.resume)
    run_dir = check_resume(cfg, checkpoint, g.resume)
    return checkpoint, run_dir, [note] if note is not None else []


def set_optim_keys(opt, lr, weight_decay, uw_lr):
    """Put the configured hyperparameters on the optimizer: a loaded optimizer state would keep the saved ones.

    Group 0 holds the model's parameters, group 1 (ANT-UW only) the log-variances (no weight decay).
    """
    opt.param_groups[0]["lr"] = lr
    opt.param_groups[0]["weight_decay"] = weight_decay
    if len(opt.param_groups) > 1:
        opt.param_groups[1]["lr"] = uw_lr


def rng_state(generator):
    """This process's random state: torch's global generators (label dropout) and the training generator
    (timesteps, noise, flips; on the training device)."""
    state = {"cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if generator.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(generator.device)
    return state


def set_rng_state(state, generator):
    """Restore rng_state's states; the CUDA one on the generator's device."""
    torch.set_rng_state(state["cpu"])
    generator.set_state(state["generator"])
    if generator.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], generator.device)


def gather_rng_states(generator):
    """Every rank's random state, as a list indexed by rank (all ranks must call this)."""
    state = rng_state(generator)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore(checkpoint, cfg, *, model, ema, opt, uw, generator, rank, world_size):
    """Continue from a checkpoint: weights, EMA, optimizer, UW and this rank's random state; the optim keys of
    cfg apply from the next step. Returns (step, notes): what changed, for the log."""
    model.load_state_dict(checkpoint["model"])
    ema.load_state_dict(checkpoint["ema"])
    opt.load_state_dict(checkpoint["opt"])
    if uw is not None:
        uw.load_state_dict(checkpoint["uw"])
    o = cfg.optim
    set_optim_keys(opt, lr=o.lr, weight_decay=o.weight_decay, uw_lr=o.uw_lr)
    step, saved = checkpoint["step"], checkpoint["config"]
    changed = changed_keys(saved, cfg, APPLIED_KEYS)
    notes = [f"{key}: {theirs} -> {ours} from step {step + 1} on" for key, theirs, ours in changed]
    states, seed = checkpoint["rng"], cfg.general.global_seed
    if saved["general"]["global_seed"] != seed:  # a fork with a new seed: fresh random streams
        old = saved["general"]["global_seed"]
        notes.append(f"general.global_seed: {old} -> {seed}: random streams start from the new seed")
    elif len(states) == world_size:
        set_rng_state(states[rank], generator)
    else:
        notes.append(
            f"checkpoint written by {len(states)} processes, resuming on {world_size}: the run continues, "
            "but not bit-exactly"
        )
    return step, notes
