"""`moe-patch` (also `python -m moe_patch`).

  moe-patch env            moe_patch's version, the start-up hook, MOE_PATCH_* in force, every backend and why
                           one is missing: the text to paste into a bug report (--version: the version only)
  moe-patch report TARGET  build the model on the meta device and print what apply() would do. TARGET: a model
                           type (qwen3_moe), a model folder, a config file (that file), or a Hub id (org/name:
                           its config only, through huggingface_hub's cache; HF_HUB_OFFLINE=1 reads the cache
                           only). --device cuda --with te,liger previews a GPU from a CPU machine
  moe-patch demo           train a tiny MoE on real text (the Python standard library's docstrings), stock and
                           patched side by side

Every user mistake is one line on stderr naming the bad value and the valid ones, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from .errors import BackendUnavailableError, PatchError

EXIT_USAGE = 2


class UsageError(PatchError):
    """A mistake on the command line: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (no usage block), with a close match for a mistyped choice."""

    def error(self, message):
        from .config import did_you_mean

        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = [c.strip(" '\"") for c in match.group(2).split(",")]
            message = message.replace(match.group(0), f"invalid choice {match.group(1)!r}"
                                      f"{did_you_mean(match.group(1), choices)}; valid: {', '.join(choices)}")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (--help lists the options)\n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --- report: what a TARGET names -------------------------------------------------------------------------------

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _model_types():
    from transformers import CONFIG_MAPPING

    return list(CONFIG_MAPPING.keys())


def _config_from_file(path: str, shown: str):
    """The config in exactly this file (not a neighbouring config.json)."""
    import json

    from transformers import AutoConfig

    from .config import unknown

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{shown}: not a readable JSON config ({_first_line(exc)})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UsageError(f"{shown}: no 'model_type' field: not a Transformers model config")
    model_type = data["model_type"]
    if model_type not in _model_types():
        raise UsageError(f"{shown}: " + unknown("model_type", model_type, _moe_types())
                         + " (and every other model type of this Transformers)")
    try:
        return AutoConfig.from_pretrained(os.path.abspath(path))
    except Exception as exc:
        raise UsageError(f"{shown}: Transformers cannot read this {model_type} config: {_first_line(exc)}") from None


def _hub_unreachable() -> bool:
    """True when the Hub's host name does not even resolve (and no proxy is set): then only the cache is read,
    instead of huggingface_hub's retries with back-off (half a minute) ending in the same answer."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return False
    except OSError:
        return True


def _config_from_hub(repo_id: str):
    """config.json of a Hub repository, through huggingface_hub (its cache, HF_HUB_OFFLINE, HF_TOKEN)."""
    import logging

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings: the one line below says what happened
    try:
        path = hf_hub_download(repo_id, "config.json", local_files_only=_hub_unreachable())
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
        raise UsageError(f"{repo_id}: its config is not in the Hugging Face cache and the Hub cannot be reached "
                         f"(no network, or HF_HUB_OFFLINE=1): give a local folder or config file") from None
    except GatedRepoError:
        raise UsageError(f"{repo_id}: a gated Hub repository: accept its terms on the Hub and log in "
                         "(hf auth login), or give a local config file") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{repo_id}: no such Hub repository (or a private one: log in with hf auth login); "
                         "not a local path either") from None
    except EntryNotFoundError:
        raise UsageError(f"{repo_id}: the Hub repository has no config.json") from None
    except OSError as exc:  # network errors that got through huggingface_hub's retries
        raise UsageError(f"{repo_id}: the Hub cannot be reached ({_first_line(exc)}) and its config is not in the "
                         "cache: give a local folder or config file") from None
    finally:
        hub_logger.setLevel(level)
    return _config_from_file(path, f"{repo_id} (config.json from the Hub)")


def _moe_types():
    """Every MoE model type of this Transformers (moe_patch/catalog.py: the families tests/matrix.py checks)."""
    from .catalog import moe_model_types

    return list(moe_model_types())


def _demo_types():
    """The model types the demo has a tiny shape for (moe_patch/shapes.py)."""
    from .shapes import TINY

    return [t for t in TINY if t != "llama"]


def load_config(target: str):
    """(config, what it is) for a model type, a model folder, a config file or a Hub id, in that order of
    checking: an existing path always wins. Raises UsageError with one line otherwise."""
    from .config import did_you_mean

    path = os.path.expanduser(target)
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise UsageError(f"{target}: a folder without config.json: give a model folder or a config file")
        return _config_from_file(config_file, config_file), f"model folder {target}"
    if os.path.isfile(path):
        return _config_from_file(path, target), f"config file {target}"
    types = _model_types()
    if target in types:
        from transformers import AutoConfig

        return AutoConfig.for_model(target), f"model type {target}, Transformers' default config"
    if HUB_ID.match(target) and not target.endswith(".json"):
        return _config_from_hub(target), f"Hub repository {target} (config only)"
    if target.endswith(".json") or os.sep in target or target.startswith("."):
        raise UsageError(f"{target}: no such file or folder")
    raise UsageError(f"unknown model type {target!r}{did_you_mean(target, types)}; give a model type (MoE ones: "
                     f"{', '.join(_moe_types())}), a model folder, a config file, or a Hub id (org/name)")


def _build_on_meta(config):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    errors = []
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except ValueError as exc:  # this auto class does not know the config class: try the next one
            errors.append(exc)
        except Exception as exc:
            raise UsageError(f"Transformers could not build {config.model_type} from this config: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None
    raise UsageError(f"Transformers has no model class for {config.model_type}: {_first_line(errors[-1])}")


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def cmd_report(args) -> int:
    from . import engine
    from .config import parse_backend, parse_kinds, unknown
    from .plan import Options
    from .preview import PACKAGES, header, preview
    from .records import Report

    from .config import FEATURE_FLAGS, from_environment

    # the environment counts as it does for apply() and MOE_PATCH=1, so the report shows what a run in this shell
    # would do (a bad value there is the same one-line error): --backend / --skip replace MOE_PATCH_BACKEND /
    # MOE_PATCH_SKIP, and --disable adds kinds to MOE_PATCH_DISABLE's, as apply(router=False) does
    env = from_environment()
    backend = parse_backend(args.backend, "--backend") if args.backend is not None else env.get("backend", "auto")
    disabled = sorted({k for k, v in env.items() if v is False} | set(parse_kinds(_split(args.disable or ""),
                                                                                  "--disable")))
    skip = tuple(_split(args.skip)) if args.skip is not None else env.get("skip", ())
    from_env = [f"{var}={os.environ[var].strip()}" for var, flag in (("MOE_PATCH_DISABLE", None),
                ("MOE_PATCH_SKIP", args.skip), ("MOE_PATCH_BACKEND", args.backend))
                if flag is None and os.environ.get(var, "").strip()]
    # the feature switches too (read where their replacement is planned): a row the report shows may depend on one;
    # so may MOE_PATCH_COMPILE (the experts' compiled gate, RMSNorm's kernel on a GPU)
    from_env += [f"{var}={os.environ[var].strip()}" for var in (*FEATURE_FLAGS, "MOE_PATCH_COMPILE")
                 if os.environ.get(var, "").strip()]
    with_ = set(_split(args.with_))
    for name in with_:
        if name not in PACKAGES:
            raise UsageError("--with: " + unknown("package", name, sorted(PACKAGES)))
    config, what = load_config(args.target)
    model = _build_on_meta(config)
    import torch

    here = "cuda" if torch.cuda.is_available() else "cpu"
    device = {"auto": here, "gpu": "cuda"}.get(args.device, args.device)
    caps_here = engine.backends.capabilities()
    previewing = device != here or any(not getattr(caps_here, PACKAGES[p]) for p in with_)
    opts = dict(backend=backend, skip=skip, **{k: False for k in disabled})
    # a preview plans here with this machine's own choice (every torch path proven here), then re-chooses
    rows = engine.plan_report(model, **dict(opts, backend="auto") if previewing else opts)
    print(f"{type(model).__name__} ({config.model_type}) from {what}: planned on the meta device, nothing changed")
    if from_env:
        print(f"from the environment: {' '.join(from_env)} (--backend / --skip replace their variable, "
              "--disable adds to MOE_PATCH_DISABLE)")
    if previewing:
        try:
            rows = Report(preview(model, rows, Options(**opts), device, with_))
        except BackendUnavailableError as exc:
            raise UsageError(f"{_first_line(exc)}; to preview a {device} machine that has it: --with te "
                             "(or liger)") from None
        print(header(device, with_))
    print()
    print(rows if args.all else _without_linear(rows, "--all shows them"))
    return 0


def _without_linear(rows, hint: str):
    from .records import Report

    kept = [r for r in rows if r.kind != "linear"]
    linear = len(rows) - len(kept)
    text = str(Report(kept))
    return text + (f"\n({linear} nn.Linear rows hidden; {hint})" if linear else "")


# --- env -----------------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _env_caveat(name: str, read, gpu) -> str:
    """What an accepted value still depends on, for `moe-patch env`: the backends named in MOE_PATCH_BACKEND that
    cannot run on this machine's GPU (apply() refuses them), when MOE_PATCH_EP is checked, what MOE_PATCH_COMPILE
    takes, where MOE_PATCH_TUNED_GEMM acts (and that MOE_PATCH_COMPILE=0 turns it off)."""
    from . import backends

    if name == "MOE_PATCH_BACKEND" and read:
        named = read["backend"] if isinstance(read["backend"], str) else ",".join(read["backend"].values())
        reasons = {b: backends.unavailable(b, gpu) for b in dict.fromkeys(named.split(",")) if b in ("te", "liger")}
        why = [f"{b}: {reason}" for b, reason in reasons.items() if reason]
        return f"; but here {'; '.join(why)}: apply() would refuse it" if why else ""
    if name == "MOE_PATCH_EP":
        return "; checked against the world size and every expert count when a model is built"
    if name == "MOE_PATCH_COMPILE" and read:
        return " (any value but 0 / false / no / off is on)"
    if name == "MOE_PATCH_TUNED_GEMM" and read:
        from .ops import compiled, tuned_gemm

        if not compiled.enabled():  # tuned_gemm.enabled() needs the compiler: the switch alone would do nothing
            off = os.environ.get("MOE_PATCH_COMPILE", "").strip()
            return f"; but MOE_PATCH_COMPILE={off} turns it off (the experts keep F.grouped_mm)"
        return (f"; read when apply() plans the experts; CUDA only: bf16 grouped GEMMs of {tuned_gemm.MIN_ROWS:,} rows "
                "or more, outside a torch.compile")
    return ""


def env_text() -> str:
    import torch

    import moe_patch

    from . import auto, backends, config

    caps = backends.capabilities()
    gpu = torch.device("cuda")
    rows = [
        ("moe_patch", f"{moe_patch.__version__} ({os.path.dirname(os.path.abspath(moe_patch.__file__))})"),
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
        ("torch", caps.torch_version),
        ("transformers", caps.transformers_version),
        ("huggingface_hub", _version("huggingface_hub") or "not installed"),
        ("wrapt", _version("wrapt") or "not installed"),
        ("cuda", f"yes: {caps.device_name}, sm{''.join(map(str, caps.compute_capability))}" if caps.cuda
         else "no: " + ("this torch is a CPU build" if torch.version.cuda is None else
                        f"torch built for CUDA {torch.version.cuda} finds no GPU")),
        ("start-up hook", auto.hook_state()),
    ]
    from .ops import compiled
    from .parallel import launch

    # each variable read by the very function moe_patch reads it with: a value it refuses is shown, not raised
    readers = {**config.READERS, "MOE_PATCH_COMPILE": compiled.enabled, "MOE_PATCH_EP": launch.ep_size}
    for name, value, note in config.in_force():
        if not note and name in readers:
            try:
                read = readers[name]()
                note = "accepted" + (f" ({'on' if read else 'off'})" if isinstance(read, bool) else "")
                note += _env_caveat(name, read, gpu)
            except PatchError as exc:
                note = f"refused: {_first_line(exc)}"
        rows.append((name, f"{value!r}" + (f"  <- {note}" if note else "")))
    if not config.in_force():
        rows.append(("MOE_PATCH_*", "none set"))
    rows.append(("grouped_mm", "yes (torch.nn.functional.grouped_mm)" if caps.grouped_mm else
                 "no: this torch has no torch.nn.functional.grouped_mm (experts use a per-expert loop)"))
    for name, dist, key in (("transformer_engine", "transformer_engine", "te"), ("liger_kernel", "liger_kernel",
                                                                              "liger")):
        why = backends.unavailable(key, gpu)
        installed = getattr(caps, key)
        version = _version(dist) or _version(dist.replace("_", "-")) or "version unknown"
        if why is None:
            rows.append((name, f"yes: {version}" + ("" if caps.cuda else " (used only on a CUDA GPU)")))
        else:
            rows.append((name, f"installed ({version}) but unusable: {why}" if installed else f"no: {why}"))
    from .ops import mamba_ssd

    kernel, why = mamba_ssd.load_kernel()
    version = _version("mamba_ssm") or _version("mamba-ssm") or "version unknown"
    rows.append(("mamba_ssm", (f"yes: {version}, Triton SSD scan (kind mamba)" + ("" if caps.cuda else
                                                                                   " (used only on a CUDA GPU)"))
                 if kernel is not None else f"no: {why}"))
    rows.append(("deep_ep", "yes (dispatcher='deepep', unverified)" if caps.deep_ep else
                 "no: not installed (build DeepEP yourself for dispatcher='deepep')"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_env(args) -> int:
    print(env_text())
    return 0


# --- demo ----------------------------------------------------------------------------------------------------

DEMO_MODULES = ("textwrap", "string", "json/__init__", "collections/__init__", "functools", "argparse",
                "difflib", "fractions", "heapq", "shlex", "statistics", "calendar", "random", "pathlib")


def stdlib_text(min_chars: int = 60_000) -> str:
    """Real English text found on any Python install: the docstrings of standard-library modules, read from
    their sources (ast, so it works under python -OO too), else from the imported modules' __doc__."""
    import ast
    import importlib
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in DEMO_MODULES:
        try:
            with open(os.path.join(stdlib, name + ".py"), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
            parts += [ast.get_docstring(n) for n in nodes]
        except (OSError, SyntaxError, ValueError):
            module = importlib.import_module(name.replace("/__init__", "").replace("/", "."))
            parts += [module.__doc__] + [getattr(v, "__doc__", None) for v in vars(module).values()]
    text = "\n\n".join(p for p in parts if isinstance(p, str) and len(p) > 40)
    if len(text) < min_chars // 10:
        raise UsageError("demo: found no standard-library docstrings to train on (stripped install?)")
    return text


def cmd_demo(args) -> int:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    import moe_patch
    from moe_patch.shapes import tiny_config

    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (more only contend)
    data = torch.frombuffer(bytearray(stdlib_text().encode("utf-8")), dtype=torch.uint8).long()
    split = int(len(data) * 0.9)
    train, held_out = data[:split], data[split:]
    seq, batch = 64, 8
    config = tiny_config(args.model_type, vocab_size=256)  # byte-level: every byte is a token, no tokenizer
    stock = AutoModelForCausalLM.from_config(config)
    model = moe_patch.apply(copy.deepcopy(stock))  # same weights on both sides
    print(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, patched:\n")
    print(_without_linear(moe_patch.report(model), f"moe-patch report {args.model_type} --all shows them"), "\n")
    print(f"Training both on {len(train):,} bytes of the Python standard library's docstrings "
          f"(byte tokens, {batch} x {seq} per step, AdamW, fp32 on CPU):\n")

    gen = torch.Generator().manual_seed(0)
    batches = [torch.stack([train[i:i + seq] for i in torch.randint(0, len(train) - seq, (batch,), generator=gen)])
               for _ in range(args.steps)]
    eval_ids = torch.stack([held_out[i:i + seq] for i in range(0, min(len(held_out) - seq, 16 * seq), seq)])

    def held_out_loss(m):
        with torch.no_grad():
            m.eval()
            loss = m(input_ids=eval_ids, labels=eval_ids).loss.item()
            m.train()
        return loss

    curves, evals = {}, {}
    for name, m in (("stock", stock), ("moe_patch", model)):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        evals[name] = [held_out_loss(m)]
        curves[name] = []
        for ids in batches:
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curves[name].append(loss.item())
        evals[name].append(held_out_loss(m))

    every = max(1, args.steps // 10)
    print(f"{'step':>5}  {'stock':>9}  {'moe_patch':>9}")
    for i, (a, b) in enumerate(zip(curves["stock"], curves["moe_patch"])):
        if i % every == 0 or i == args.steps - 1:
            print(f"{i + 1:>5}  {a:9.4f}  {b:9.4f}")
    print(f"held-out text, before -> after: stock {evals['stock'][0]:.4f} -> {evals['stock'][1]:.4f}, "
          f"moe_patch {evals['moe_patch'][0]:.4f} -> {evals['moe_patch'][1]:.4f}\n")
    worst = max(abs(a - b) / abs(a) for a, b in zip(curves["stock"] + evals["stock"],
                                                    curves["moe_patch"] + evals["moe_patch"]))
    if worst < 1e-4:
        print(f"Same losses (largest relative difference {worst:.1e}, float rounding): the patched model computes "
              "what the stock model computes, step after step; its speed shows on a GPU (benchmarks/), not on "
              "this CPU.")
    else:
        print(f"The losses DIFFER (largest relative difference {worst:.1e}): please report this with "
              "`moe-patch env`.")
        return 1
    return 0


# --- entry point ---------------------------------------------------------------------------------------------

def _parser():
    import moe_patch

    parser = _Parser(prog="moe-patch", description=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moe_patch {moe_patch.__version__}")
    parser.add_argument("--traceback", action="store_true", help="on an unexpected error, show the traceback")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="{env,report,demo}")
    sub.add_parser("env", help="version, start-up hook, MOE_PATCH_* variables and backends here").set_defaults(
        fn=cmd_env)
    rep = sub.add_parser("report", help="plan a model on the meta device and print what apply() would do")
    rep.add_argument("target", help="model type (qwen3_moe), model folder, config file, or Hub id (org/name)")
    rep.add_argument("--backend", help="auto | torch | te | liger, or per kind: loss=torch,experts=te "
                                        "(default: MOE_PATCH_BACKEND, else auto)")
    rep.add_argument("--disable", help="comma-separated kinds to leave alone (attention, rmsnorm, linear, experts, "
                                       "router, loss, mamba, mlp), besides MOE_PATCH_DISABLE's")
    rep.add_argument("--skip", help="comma-separated module-path globs to leave alone (default: MOE_PATCH_SKIP)")
    rep.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "gpu"),
                     help="plan for this device (auto: this machine's; gpu: cuda); cuda on a CPU machine is a preview")
    rep.add_argument("--with", dest="with_", default="", metavar="te,liger,mamba",
                     help="preview as if these packages were installed (te, liger, mamba: mamba-ssm)")
    rep.add_argument("--all", action="store_true", help="also list every nn.Linear")
    rep.set_defaults(fn=cmd_report)
    demo = sub.add_parser("demo", help="train a tiny MoE on real text, stock and patched side by side")
    demo.add_argument("--model-type", default="qwen3_moe", choices=_demo_types(),
                      help="the family (choices: %(choices)s)", metavar="TYPE")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default %(default)s)")
    demo.set_defaults(fn=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except PatchError as exc:  # a user's mistake (or an environment that cannot do what was asked)
        print(f"moe-patch {args.command}: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `moe-patch report ... | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as exc:
        if args.traceback:
            raise
        print(f"moe-patch {args.command}: unexpected error (a bug: please report it with `moe-patch env`; "
              f"`moe-patch --traceback {args.command} ...` shows where): {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
