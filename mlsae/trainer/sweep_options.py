"""`train.py` options that may be lists: a sweep's SAEs, their names and its folder.

`--expansion_factor 32 64 -k 16 32` makes a sweep of every combination. Each SAE's options
are the command line with one value of each list, parsed exactly as a single run's, with
its own `--run` (docs/sweeps.md).
"""

from dataclasses import dataclass
from itertools import product
from pathlib import Path

from mlsae import names
from mlsae.cli import ConfigError, parse
from mlsae.trainer.config import RunConfig

SWEPT_OPTIONS = {
    "--expansion_factor": "x",
    "-k": "k",
    "--architecture": "",
    "--auxk": "auxk",
    "--lr": "lr",
}
"""The options that may take several values, and the prefix of their value in a name."""

ALIASES = {"--k": "-k"}

SINGLE_RUN_ONLY = ("--output_dir",)
"""Options that name one run's outputs, which a sweep cannot take."""


@dataclass
class SweepMemberOptions:
    """One SAE of a sweep: its name, its command line, its options."""

    name: str
    args: list[str]
    config: RunConfig


def _option(word: str) -> str | None:
    name = word.split("=", 1)[0]
    name = ALIASES.get(name, name)
    return name if name in SWEPT_OPTIONS else None


def _is_value(word: str) -> bool:
    if not word.startswith("-"):
        return True
    try:
        float(word)
        return True
    except ValueError:
        return False


def split_lists(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The command line without the swept options, and the values each swept option was
    given (in order)."""
    rest: list[str] = []
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        option = _option(args[i])
        if option is None:
            rest.append(args[i])
            i += 1
            continue
        inline = "=" in args[i]
        given = [args[i].split("=", 1)[1]] if inline else []
        i += 1
        while not inline and i < len(args) and _is_value(args[i]):
            given.append(args[i])
            i += 1
        values.pop(option, None)  # the last one counts, as for any option
        values[option] = given
    return rest, values


def is_sweep(args: list[str]) -> bool:
    """Whether the command line gives one of `SWEPT_OPTIONS` several values."""
    try:
        _, values = split_lists(args)
    except ConfigError:  # pragma: no cover
        return False
    return any(len(v) > 1 for v in values.values())


def _suffix(option: str, value: str) -> str:
    return f"{SWEPT_OPTIONS[option]}{value}"


def sweep_members(args: list[str]) -> tuple[list[SweepMemberOptions], RunConfig]:
    """The SAEs of the sweep that `args` asks for, and the options they share (those of the
    first SAE); a `ConfigError` (one line) for a sweep that cannot work."""
    rest, values = split_lists(args)
    for option in SINGLE_RUN_ONLY:
        if any(word.split("=", 1)[0] == option for word in rest):
            raise ConfigError(
                f"{option} names one run's outputs; a sweep saves each SAE in its run"
            )
    swept = [option for option, given in values.items() if len(given) > 1]
    base = parse(RunConfig, rest)
    members = []
    for combination in product(*(values[option] or [""] for option in values)):
        chosen = dict(zip(values, combination, strict=True))
        member_args = list(rest)
        for option, value in chosen.items():
            member_args += [option, value] if value else [option]
        config = parse(RunConfig, member_args)
        suffix = "-".join(_suffix(option, chosen[option]) for option in swept)
        name = _member_name(config, base.run, suffix, swept)
        config.run = name
        members.append(SweepMemberOptions(name, [*member_args, "--run", name], config))
    seen: dict[str, str] = {}
    for member in members:
        if member.name in seen:
            raise ConfigError(f"the sweep gives two SAEs the run name {member.name}: drop repeats")
        seen[member.name] = member.name
    return members, base


def _member_name(config: RunConfig, run: str | None, suffix: str, swept: list[str]) -> str:
    if run:
        return f"{run}-{suffix}"
    ae = config.autoencoder
    name = names.run_name(
        config.model_name, ae.expansion_factor, ae.k, config.layers, config.site, ae.architecture
    )
    extra = [
        _suffix(option, str(value))
        for option, value in (("--auxk", ae.auxk), ("--lr", ae.lr))
        if option in swept
    ]
    return "-".join([name, *extra])


def sweep_name(base: RunConfig, members: list[SweepMemberOptions]) -> str:
    """The sweep's folder under `--run_dir`: `--run`, or `sweep-` and its SAEs' options."""
    if base.run:
        return base.run
    ae = base.autoencoder
    model = base.model_name.rstrip("/").split("/")[-1]

    def values(get) -> str:
        return "+".join(dict.fromkeys(str(get(m.config.autoencoder)) for m in members))

    name = f"sweep-{model}-x{values(lambda a: a.expansion_factor)}-k{values(lambda a: a.k)}"
    if len({m.config.autoencoder.architecture for m in members}) > 1 or ae.architecture != "topk":
        name += f"-{values(lambda a: a.architecture)}"
    if len({m.config.autoencoder.auxk for m in members}) > 1:
        name += f"-auxk{values(lambda a: a.auxk)}"
    if len({m.config.autoencoder.lr for m in members}) > 1:
        name += f"-lr{values(lambda a: a.lr)}"
    return name


def sweep_dir(base: RunConfig, members: list[SweepMemberOptions]) -> Path:
    return Path(base.trainer.run_dir) / sweep_name(base, members)
