"""Bad input is answered with one line, never a traceback.

ConfigError's message names the field, the value and the fix, e.g.
`data.text=notes.txt: no such file or folder; give a .txt, .jsonl or .parquet file, a folder or a glob`.
The entry point prints it as `error: <message>` on stderr and exits with status 2; the argument
parsers answer their own errors the same way.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path

from llm.compat import (
    PARSER_BAD_VALUE,
    PARSER_CHOICES,
    PARSER_EXPECTED_TYPE,
    PARSER_MISSING_CONFIG,
    PARSER_NESTED_OPTION,
    PARSER_UNKNOWN_OPTION,
)


class ConfigError(ValueError):
    """A bad input, found before any expensive work."""


class RunStopped(Exception):
    """Training stopped before its end, with what happened and what to do next: a stop signal (after
    a checkpoint), too many non-finite steps in a row, a checkpoint that could not be written. The
    entry point prints `stopped: <message>` on stderr and exits with `status`. `requeue`: the SLURM
    job to put back in the queue once this process has finished its cleanup (W&B's files complete),
    as its last act: SLURM ends the job's processes as soon as it is requeued; `otherwise`, what to
    do if that fails."""

    def __init__(self, message: str, status: int = 1, requeue: str | None = None, otherwise: str = ""):
        super().__init__(message)
        self.status = status
        self.requeue = requeue
        self.otherwise = otherwise


# a dtype's other names -> Lightning's precision for it (trainer.precision=fp16 means 16-mixed)
DTYPE_PRECISIONS = {
    "fp16": "16-mixed or bf16-mixed",
    "float16": "16-mixed or bf16-mixed",
    "half": "16-mixed or bf16-mixed",
    "bfloat16": "bf16-mixed",
    "fp32": "32-true",
    "float32": "32-true",
    "float": "32-true",
    "fp64": "64-true",
    "float64": "64-true",
    "double": "64-true",
}


def nearest_keys(given: str, known: list[str]) -> list[str]:
    """The options a mistyped one most likely meant, best first: the same last part in another
    section (`lr` for model.optimizer.lr), a close spelling of the whole (trainer.max_stepz) or of its
    last part, or the last part's initials (learning_rate for lr)."""
    leaf = given.rsplit(".", 1)[-1]
    parent = given.rpartition(".")[0]
    leaves = {key: key.rsplit(".", 1)[-1] for key in known}

    def near_parent_first(keys):  # a key under the section the user named comes first
        return sorted(keys, key=lambda k: not (parent and k.startswith(parent + ".")))

    same_leaf = [key for key, last in leaves.items() if last == leaf]
    if same_leaf:
        return near_parent_first(same_leaf)[:3]
    close = difflib.get_close_matches(given, known, 1, 0.8)
    if close:
        return close
    initials = "".join(word[0] for word in leaf.split("_") if word)
    close_leaves = set(difflib.get_close_matches(leaf, sorted(set(leaves.values())), 3, 0.75))
    if len(initials) > 1:
        close_leaves.add(initials)
    return near_parent_first([key for key, last in leaves.items() if last in close_leaves])[:3]


def either(names: list[str]) -> str:
    return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]


def _unknown_option(arg: str, known: list[str] | None, renamed: dict[str, str] | None = None) -> str:
    key, has_value, value = arg.lstrip("-").partition("=")
    given = f"--{key}={value}" if has_value else f"--{key}"
    if renamed and key in renamed:
        return f"{given}: renamed; use --{renamed[key]}{'=' + value if has_value else ''}"
    near = nearest_keys(key, known) if known else []
    hint = f"did you mean {either(['--' + k for k in near])}?" if near else "--help lists the options"
    return f"{given}: no such option; {hint}"


def _bad_value(key: str, value: str, text: str) -> str:
    choices = list(dict.fromkeys(re.findall(r"'([^']+)'", " ".join(PARSER_CHOICES.findall(text)))))
    # Lightning's old spellings ("16" beside "16-mixed") are accepted but not suggested
    choices = [c for c in choices if c + "-mixed" not in choices and c + "-true" not in choices]
    if choices:
        near = DTYPE_PRECISIONS.get(value.lower()) if key.endswith("precision") else None
        near = near or either(difflib.get_close_matches(value, choices, 2, 0.6))
        hint = f"did you mean {near}? " if near else ""
        return f"{key}={value}: not a valid value; {hint}(one of {', '.join(choices)})"
    expected = PARSER_EXPECTED_TYPE.search(text)
    if expected and "Union subtypes" not in text:  # one type expected (a union's reasons are its own)
        kinds = {"int": "a whole number", "float": "a number", "bool": "true or false"}
        kind = kinds.get(expected[1], f"a {expected[1]}")
        return f"{key}={value}: not {kind}"
    return ""


def _missing_config(key: str, path: str) -> str:
    """A config file that is not there, with the ones its folder has (MODEL=, CONFIG=)."""
    folder = Path(path).parent
    if str(folder) == "." or not folder.is_dir():  # the folder its kind lives in, as make runs from the repository
        folder = Path("configs") / ("experiment" if key == "config" else key.split(".")[0])
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    listed = f"{folder}/ has {', '.join(names)}" if names else f"see {folder}/"
    variable = {"config": " (CONFIG=)", "model.config": " (MODEL=)"}.get(key, "")
    return f"{key}={path}: no such config file; {listed}{variable}"


def one_line(message: str, known: list[str] | None = None, renamed: dict[str, str] | None = None) -> str:
    """An argument parser's message on one line, with the fix where one can be told: the nearest
    option names (`known`, the parser's keys; `renamed`, old names and their new ones), the valid
    values, the config files there are."""
    text = re.sub(r"\s+", " ", str(message)).strip()
    missing = PARSER_MISSING_CONFIG.search(text)
    if missing:  # e.g. MODEL=nope becomes --model.config=configs/model/nope.yaml
        key, path = missing.groups()
        if key in (renamed or {}):  # an old option that is now a section (--model= for --model.config=)
            return _unknown_option(f"{key}={path}", known, renamed)
        inside = Path(path).is_absolute() and Path(path).is_relative_to(Path.cwd())  # jsonargparse made it absolute
        return _missing_config(key, os.path.relpath(path) if inside else path)
    unknown = PARSER_UNKNOWN_OPTION.match(text)
    if unknown:
        return _unknown_option(unknown[1], known, renamed)
    nested = PARSER_NESTED_OPTION.search(text)
    if nested:  # a subclass section's option (--data.batchsize)
        section, key, value = nested.groups()
        return _unknown_option(f"{section}.{key}={value}", known)
    value = PARSER_BAD_VALUE.match(text)
    said = value and _bad_value(value[1].replace(".init_args.", "."), value[2], text)
    if said:
        return said
    return text if len(text) < 400 else text[:397] + "..."


class OneLineErrors:
    """Mixin for jsonargparse parsers: `error: <message>` on stderr, exit status 2, no usage dump."""

    def error(self, message: str, ex: Exception | None = None):
        if not getattr(self, "exit_on_error", True):
            return super().error(message, ex)  # type: ignore[misc]  # jsonargparse's parser, mixed in after this
        sys.stderr.write(f"error: {one_line(message, self.option_keys(), getattr(self, 'renamed', None))}\n")
        sys.exit(2)

    def option_keys(self) -> list[str]:
        """Every option as a user writes it (data.batch_size for data.init_args.batch_size)."""
        try:
            keys = self.get_defaults(skip_check=True).keys()  # type: ignore[attr-defined]  # the parser's
        except Exception:  # a parser that cannot give its defaults still answers in one line
            return []
        return [k.replace(".init_args.", ".") for k in keys if not k.endswith((".class_path", ".help"))]


def exception_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, cut at `limit` characters: the reason inside a one-line answer."""
    text = " ".join(str(exc).split())
    return text[:limit] + ("..." if len(text) > limit else "")
