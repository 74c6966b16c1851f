"""
configurator.py: train.py's command line, much as nanoGPT's configurator.py does it. Every knob is a global in
train.py's config block; `--key value` or `--key=value` overrides one, type-checked against its default (a bare
`--flag` means true for a true/false knob); `--help` prints the block with its comments. Then resolve fills in
what a knob left to the game (-1 or 0: envs.py's defaults for it) and a preset's values, and checks them all.
"""
import ast
import sys

import torch

import envs

def config_help(path):
    """The config block of the script at path, read from it: one `--name  default  comment` line per knob."""
    src = open(path).read().split("# config:")[1].split("# ---")[0].splitlines()[1:]   # [0]: the header's rest
    out = []
    for line in src:
        if "=" in line and not line.startswith("#"):
            name, rest = line.split("=", 1)
            value, _, comment = rest.partition("#")                       # no default contains a '#'
            out.append(f"  --{name.strip():<18} {value.strip():<16} {comment.strip()}".rstrip())
    return "\n".join(out)

def parse_args(argv, cfg, usage="", path=None):
    """--key value / --key=value over cfg (the script's config globals), type-checked against the defaults.
    --help prints usage and the config block of the script at path."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage + "knobs (default):\n" + config_help(path))
        sys.exit(0)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            sys.exit(f"error: expected --key value, got {arg!r} (see --help)")
        key, eq, val = arg[2:].partition("=")
        if not eq and i < len(argv) and not argv[i].startswith("--"):
            val = argv[i]
            i += 1
        elif not eq:
            if not isinstance(cfg.get(key), bool):
                sys.exit(f"error: --{key} needs a value (see --help)")
            val = "True"                                                # a bare --resume means True
        if key not in cfg:
            sys.exit(f"error: unknown config key --{key} (see --help for the list)")
        default = cfg[key]
        try:
            new = ast.literal_eval(val) if not isinstance(default, str) else val
        except (ValueError, SyntaxError):
            new = {"true": True, "false": False}.get(val.lower(), val) if isinstance(default, bool) else val
        if isinstance(default, bool) and not isinstance(new, bool):
            sys.exit(f"error: --{key} wants true or false, got {val!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(new, bool) or not isinstance(new, (int, float)) or (isinstance(default, int) and not isinstance(new, int)):
                sys.exit(f"error: --{key} wants a {type(default).__name__}, got {val!r}")
            new = type(default)(new)
        cfg[key] = new
    return cfg

PRESETS = {"paper": dict(lr=3e-6, max_iters=1000, model_name="Qwen/Qwen2.5-1.5B-Instruct", max_msg_tokens=128,
                         n_games=lambda game: game.paper_n_games)}

def resolve(cfg, given=(), world=1):
    """Fill in the game's defaults (envs.py), apply a preset (to the knobs not given on the command line), check values."""
    if cfg["env"] not in envs.GAMES:
        sys.exit(f"error: --env must be one of {', '.join(envs.GAMES)}, got {cfg['env']!r}")
    game = envs.GAMES[cfg["env"]]
    if cfg["algo"] not in ("adalign", "naive", "sum"):
        sys.exit(f"error: --algo must be adalign, naive or sum, got {cfg['algo']!r}")
    if cfg["preset"]:
        if cfg["preset"] not in PRESETS:
            sys.exit(f"error: unknown --preset {cfg['preset']!r}: choose {', '.join(PRESETS)}")
        for k, v in PRESETS[cfg["preset"]].items():
            if k not in given:                                          # --preset paper --model_name X keeps X
                cfg[k] = v(game) if callable(v) else v
    d = dict(game.defaults, entropy_coef=game.defaults["entropy_coef"] if cfg["algo"] == "adalign" else 0.0)
    for k in ("beta", "gamma", "reward_scale", "kl_coef", "buffer_fixed_prob", "entropy_coef"):
        if cfg[k] == -1:                                                # -1 is the only "default" value
            cfg[k] = d[k]
        elif cfg[k] < 0:
            sys.exit(f"error: --{k} must be -1 (the game's default) or >= 0, got {cfg[k]}")
    if cfg["buffer_fixed"] == "auto":
        cfg["buffer_fixed"] = d["buffer_fixed"]
    for k in ("n_games", "group_size"):
        if cfg[k] < 0:
            sys.exit(f"error: --{k} must be 0 (the game's default) or positive, got {cfg[k]}")
    cfg["n_games"] = cfg["n_games"] or d["n_games"]
    cfg["group_size"] = cfg["group_size"] or min(d["group_size"], cfg["n_games"])  # fewer games: one group of all
    if cfg["micro_tokens"] < 0:
        sys.exit(f"error: --micro_tokens must be 0 (per device) or positive, got {cfg['micro_tokens']}")
    for k in ("n_games", "n_rounds", "max_iters", "ckpt_interval", "buffer_interval", "buffer_size", "max_msg_tokens",
              "api_concurrency"):
        if cfg[k] < 1:
            sys.exit(f"error: --{k} must be at least 1, got {cfg[k]}")
    if cfg["n_games"] % cfg["group_size"]:
        sys.exit(f"error: n_games ({cfg['n_games']}) must be a multiple of group_size ({cfg['group_size']})")
    if cfg["n_games"] % (world * cfg["group_size"]):
        sys.exit(f"error: {world} processes need n_games ({cfg['n_games']}) to be a multiple of {world} x group_size "
                 f"({cfg['group_size']}): each plays whole groups")
    if cfg["fsdp_offload"] and not cfg["fsdp"]:
        sys.exit("error: --fsdp_offload true needs --fsdp true (it keeps the shards in host memory)")
    if cfg["fsdp_offload"] and (cfg["device"] == "cpu" or cfg["device"] == "auto" and not torch.cuda.is_available()):
        sys.exit("error: --fsdp_offload moves the shards from the GPU to host memory: on a CPU they are there already")
    if cfg["gamma"] > 1 or cfg["lr"] <= 0 or cfg["temperature"] <= 0:    # gamma 0: each round's credit is its own
        sys.exit("error: need 0 <= gamma <= 1, lr > 0 and temperature > 0")
    for k in ("buffer_prob", "buffer_fixed_prob"):
        if not 0 <= cfg[k] <= 1:
            sys.exit(f"error: --{k} must be between 0 and 1, got {cfg[k]}")
    bad = [n for n in cfg["buffer_fixed"].split(",") if n and n not in game.strategies]
    if bad:
        sys.exit(f"error: --buffer_fixed: {', '.join(bad)} not {cfg['env']} strategies ({', '.join(game.strategies)})")
    return cfg
