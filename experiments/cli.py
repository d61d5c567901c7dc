"""What every program under experiments/ does with an error, in one place.

An error whose message says it all (`switchjax.config.ReportedError`: every user error,
`ConfigError`, `CheckpointError`, `DataError`, `ConversionError`, and the stops of a run,
`NonFiniteError`, `Preempted`) is printed as one line, `error: <message>`, on stderr,
without a traceback, and the program exits with the error's `exit_status`: 2 for user
errors (a config field, a flag, a file, the disk), 1 for a non-finite loss, 143 for a
preemption (SIGTERM, after the checkpoint is written). A bad command-line flag is a user
error too (status 2). Any other exception is a bug and keeps its traceback.

    from experiments import cli
    cli.run(main)                  # absl programs (flags parsed by absl)
    cli.run_plain(main)            # argparse programs: main() parses sys.argv itself
"""
from __future__ import annotations

import functools
import re
import sys
from typing import Callable, Sequence

from switchjax.config import ReportedError

USAGE_STATUS = 2


def _exit(message: str, status: int):
    sys.stderr.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def clean_errors(main: Callable) -> Callable:
    """`main` with `ReportedError`s turned into one line on stderr and their exit status."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ReportedError as e:
            _exit(str(e), e.exit_status)
    return wrapped


def _chain(error: BaseException) -> list[BaseException]:
    out = []
    while error is not None and error not in out:
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def _flag_error(argv: Sequence[str], error: Exception) -> str:
    """One line for an exception raised while absl parsed `argv`."""
    text = " ".join(str(error.args[0] if error.args else error).replace("\\n", " ").split())
    if "Error whilst parsing config file" in text:  # ml_collections embeds the traceback
        last = str(error).strip().splitlines()[-1]
        return f"the config file failed: {' '.join(last.split())}"
    flag = re.match(r"flag (--[\w.-]+)=(.*?): (.*)", text)
    if flag and "must have a value other than None" in text:  # a required flag
        return f"{flag.group(1)} is required. Fix: pass {flag.group(1)}=..."
    if flag:  # a value absl or ml_collections cannot parse
        return (f"{flag.group(1)}={flag.group(2)!r}: {flag.group(3).rstrip('.')}. Fix: give a "
                "value of the flag's type")
    if isinstance(error, (KeyError, AttributeError)):  # --config.<no such field>=...
        found = re.search(r"'([A-Za-z_]\w*)\\?'", text)
        key = found.group(1) if found else text
        arg = next((a for a in argv[1:] if a.startswith("--")
                    and f".{key}" in a.split("=")[0]), key)
        hint = re.search(r'Did you mean "\w+"', text)
        return (f"{arg}: the config has no field {key!r}"
                + (f" ({hint.group(0)}?)" if hint else "") + ". Fix: check the spelling")
    return text


def _parse_flags(argv: Sequence[str]):
    """absl's flag parsing, with a bad flag (a misspelled --config.field, a config file
    that does not load, a value of the wrong type) as one line and status 2."""
    from absl import flags
    from ml_collections import config_flags
    try:
        parsed = flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError) as e:
        reported = [c for c in _chain(e) if isinstance(c, ReportedError)]
        if reported:  # e.g. a ConfigError from get_config(): the innermost is the original
            _exit(str(reported[-1]), reported[-1].exit_status)
        _exit(f"{_flag_error(argv, e)} (--helpfull lists the flags).", USAGE_STATUS)
    for name in list(flags.FLAGS):  # a config file that did not load fails only when read
        flag = flags.FLAGS[name]
        if flag.present:
            try:
                getattr(flag.value, "keys")
            except AttributeError:  # not a config
                continue
            except OSError as e:
                text = " ".join(str(e.__cause__ or e).split())
                found = re.search(r"\[Errno \d+\] ([^:]+)", text)
                reason = found.group(1) if found else text
                _exit(f"--{name}={config_flags.get_config_filename(flag)!r}: cannot be loaded "
                      f"({reason}). Fix: pass an existing configs/X.py[:arg].", USAGE_STATUS)
    return parsed


def run(main: Callable) -> None:
    """`absl.app.run(main)` with the error handling above."""
    from absl import app
    app.run(clean_errors(main), flags_parser=_parse_flags)


def run_plain(main: Callable) -> None:
    """Calls `main()` (which parses its own arguments) with the error handling above."""
    clean_errors(main)()

