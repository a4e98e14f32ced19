"""The `pagedserve` command.

    pagedserve generate PROMPT... [engine flags] [sampling flags]
    pagedserve serve ... / pagedserve client ...   (from pagedserve.server.cli, when present)
    pagedserve bench [workload flags] [engine flags]  (from pagedserve.bench)

Every flag also reads PAGEDSERVE_<FLAG_IN_UPPER_SNAKE_CASE> (an explicit flag wins).
Engine flags are generated from EngineConfig's fields by `add_engine_flags`, which
other subcommands reuse, so a new setting appears everywhere at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
from typing import Any, Callable

ENV_PREFIX = "PAGEDSERVE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

# Modules that may add subcommands: each function gets the subparsers object and adds
# its parser with set_defaults(func=handler), handler(args) -> exit code.
SUBCOMMAND_HOOKS = (
    ("pagedserve.server.cli", "add_serve_parser"),
    ("pagedserve.server.cli", "add_client_parser"),
    ("pagedserve.bench", "add_bench_parser"),
)


class EnvError(ValueError):
    """A PAGEDSERVE_* variable holds a value its flag does not accept."""


def env_var(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}, got {text!r}")


def add_flag(parser: Any, *names: str, **kwargs: Any) -> argparse.Action:
    """parser.add_argument whose default comes from PAGEDSERVE_<DEST> when that is set
    (read when the parser is built, never at import)."""
    action = parser.add_argument(*names, **kwargs)
    raw = os.environ.get(env_var(action.dest))
    if raw is not None:
        try:
            action.default = _from_env(action, raw)
        except (ValueError, TypeError) as e:
            raise EnvError(f"{env_var(action.dest)}: {e}") from None
        action.required = False
    if action.help is not None and action.help is not argparse.SUPPRESS:
        action.help += f" [env {env_var(action.dest)}]"
    return action


def _from_env(action: argparse.Action, raw: str) -> Any:
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction,
                           argparse._StoreFalseAction)):
        return parse_bool(raw)
    convert: Callable[[str], Any] = action.type or str
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
        items = json.loads(raw) if raw.lstrip().startswith("[") else raw.split(",")
        values = [convert(str(v).strip()) for v in items]
    else:
        values = [convert(raw)]
    if action.choices is not None:
        for v in values:
            if v not in action.choices:
                raise ValueError(f"{v!r} is not one of {', '.join(map(str, action.choices))}")
    return values if _is_list_action(action) else values[0]


def _is_list_action(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")


# ---- flags generated from dataclasses ---------------------------------------------------

def _field_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass: the comment is the help."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", source, flags=re.M)
    return {name: text.strip() for name, text in found}


def _flag_kwargs(field: dataclasses.Field, choices: dict[str, Any]) -> dict[str, Any]:
    kind = str(field.type)
    if kind.startswith("bool"):
        return {"action": argparse.BooleanOptionalAction}
    if kind.startswith("list[str]"):
        return {"action": "append", "metavar": "TEXT"}
    if kind.startswith("list[int]"):
        return {"nargs": "+", "type": int, "metavar": "ID"}
    kwargs: dict[str, Any] = {"type": int if kind.startswith("int") else
                              float if kind.startswith("float") else str}
    if field.name in choices:
        kwargs["choices"] = choices[field.name]
    return kwargs


def _add_dataclass_flags(parser: Any, cls: type, choices: dict[str, Any],
                         rename: dict[str, str] | None = None) -> None:
    helps = _field_comments(cls)
    rename = rename or {}
    for field in dataclasses.fields(cls):
        dest = rename.get(field.name, field.name)
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = helps.get(field.name, field.name.replace("_", " "))
        if default is not None:
            help_text += f" (default {default})"
        add_flag(parser, "--" + dest.replace("_", "-"), dest=dest, default=None,
                 help=help_text, **_flag_kwargs(field, choices))


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (--block-size, --preemption-mode, ...)."""
    from pagedserve.config import LOAD_FORMATS, PREEMPTION_MODES, EngineConfig

    group = parser.add_argument_group("engine")
    _add_dataclass_flags(group, EngineConfig, {
        "preemption_mode": PREEMPTION_MODES, "load_format": LOAD_FORMATS})


def engine_config_from_args(args: argparse.Namespace) -> Any:
    """EngineConfig from parsed flags; flags not given keep the config's defaults."""
    from pagedserve.config import EngineConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
              if getattr(args, f.name, None) is not None}
    return EngineConfig(**values)


# The request seed must not collide with the engine's --seed.
_SAMPLING_RENAMES = {"seed": "sampling_seed"}


# Constraints given as a file: a schema or a grammar is rarely one line.
FILE_CONSTRAINTS = {
    "json_schema": "the output is JSON conforming to the JSON Schema in FILE",
    "grammar": "the output is a sentence of the EBNF (GBNF) grammar in FILE (start rule root)",
}


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    from pagedserve.sampling_params import SamplingParams

    group = parser.add_argument_group("sampling")
    _add_dataclass_flags(group, SamplingParams, {}, _SAMPLING_RENAMES)
    for action in group._group_actions:
        if action.dest in FILE_CONSTRAINTS:
            action.metavar = "FILE"
            action.help = FILE_CONSTRAINTS[action.dest] + f" [env {env_var(action.dest)}]"


def read_constraint_file(flag: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror}") from None


def sampling_params_from_args(args: argparse.Namespace) -> Any:
    from pagedserve.sampling_params import SamplingParams

    values = {}
    for f in dataclasses.fields(SamplingParams):
        value = getattr(args, _SAMPLING_RENAMES.get(f.name, f.name), None)
        if value is not None and f.name in FILE_CONSTRAINTS:
            value = read_constraint_file("--" + f.name.replace("_", "-"), value)
        if value is not None:
            values[f.name] = value
    return SamplingParams(**values)


# ---- generate -------------------------------------------------------------------------

def add_generate_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text offline for one or more prompts",
                              description="Generate text with the offline engine.")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    add_flag(p, "--chat", action="store_true", default=False,
             help="send each prompt as a user message through the chat template")
    add_flag(p, "--json", action="store_true", default=False,
             help="print one JSON object per prompt (text, token ids, finish reason, usage)")
    add_flag(p, "--progress", action=argparse.BooleanOptionalAction, default=False,
             help="show a progress bar")
    add_engine_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    config = engine_config_from_args(args)
    from pagedserve.llm import LLM

    llm = LLM(**dataclasses.asdict(config))
    prompts: list[Any] = list(args.prompts)
    if args.chat:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    outputs = llm.generate(prompts, params, use_tqdm=args.progress)
    for prompt, out in zip(args.prompts, outputs):
        if args.json:
            m = out.metrics
            print(json.dumps({
                "prompt": prompt,
                "completions": [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                                 "finish_reason": c.finish_reason} for c in out.outputs],
                "usage": {"prompt_tokens": m.num_prompt_tokens,
                          "completion_tokens": sum(len(c.token_ids) for c in out.outputs),
                          "cached_prompt_tokens": m.num_cached_tokens,
                          "preemptions": m.num_preemptions}}, ensure_ascii=False))
        else:
            for c in out.outputs:
                print(c.text)
    return 0


# ---- entry point ----------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """Reports a bad flag in one line, `pagedserve serve: error: ...`, exit status 2:
    the form every configuration error takes, easy to find in a container's log."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pagedserve",
                                     description="LLM serving on PagedAttention.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_parser(subparsers)
    for module_name, function in SUBCOMMAND_HOOKS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue  # that part of the package is not there (yet)
            raise
        hook = getattr(module, function, None)
        if hook is not None:
            hook(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except EnvError as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad settings or input: say which, no traceback
        print(f"pagedserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
