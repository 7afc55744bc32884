"""Generate docs/reference/config.md from the config tree refusal_lab/conf/.

The page lists the primary config's defaults list and top-level keys, then every config group
(each folder under refusal_lab/conf/), each option file in it with its header comment, its own
defaults list and every key with its value and the YAML comment that describes it.

It only reads the YAML files as text (and with PyYAML for the values of multi-line lists); it imports
nothing from refusal_lab, so it runs without torch. The output depends only on the files' contents:
folders and files are taken in sorted order and nothing time- or machine-dependent is written.

    python scripts/docs_config_reference.py            # (re)write docs/reference/config.md
    python scripts/docs_config_reference.py --check    # exit 1 if the committed page is out of date
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "refusal_lab" / "conf"
PAGE = ROOT / "docs" / "reference" / "config.md"
PRIMARY = "config.yaml"

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_][A-Za-z0-9_.\-]*)\s*:(?:\s+(?P<rest>.*))?$")
ITEM_LINE = re.compile(r"^(?P<indent> *)-\s+(?P<rest>.*)$")
PACKAGE_LINE = re.compile(r"^#\s*@package\s+(?P<package>\S+)\s*$")
DEFAULTS_ENTRY = re.compile(r"^(?:(?P<override>override)\s+)?(?P<group>[^:@\s]+)(?:@(?P<package>[^:\s]+))?\s*:\s*(?P<option>\S+)$")
MAX_INLINE_VALUE = 80  # a block list longer than this in flow style is shown by its length


# -- reading one file --------------------------------------------------------------------------


@dataclass
class Key:
    path: str  # dotted, relative to where the file's keys land
    raw: str  # the value as written on the key's line ("" for a mapping or a block list)
    comment: str  # the trailing comment, with its continuation lines
    leading: str  # the comment block right above the key


@dataclass
class DefaultsEntry:
    text: str
    comment: str


@dataclass
class ConfigFile:
    path: Path
    package: str | None
    header: list[str]
    defaults: list[DefaultsEntry] = field(default_factory=list)
    keys: list[Key] = field(default_factory=list)
    data: Any = None


def split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes or not after a space is part of the value."""
    quote: str | None = None
    for i, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), ""


def comment_text(line: str) -> str:
    """The text of a comment-only line, without the ``#`` and one following space (further indentation kept)."""
    body = line.strip()[1:]
    return body.removeprefix(" ")


def read_config(path: Path) -> ConfigFile:
    lines = path.read_text(encoding="utf-8").splitlines()
    package = None
    header: list[str] = []
    start = 0
    for start, line in enumerate(lines):  # the header: the comment block at the top, up to a blank or other line
        if not line.strip().startswith("#"):
            break
        match = PACKAGE_LINE.match(line.strip())
        if match:
            package = match.group("package")
        else:
            header.append(comment_text(line))
    else:
        start = len(lines)
    result = ConfigFile(path=path, package=package, header=header, data=yaml.safe_load("\n".join(lines)) or {})

    stack: list[tuple[int, str]] = []
    leading: list[str] = []
    previous: tuple[Key | DefaultsEntry, int] | None = None  # the last thing a trailing comment went to, its column limit
    in_defaults = False
    block: int | None = None  # inside a block scalar (| or >) of a key at this indentation
    for line in lines[start:]:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if block is not None:
            if not stripped or indent > block:
                continue
            block = None
        if not stripped:
            leading, previous = [], None
            continue
        if stripped.startswith("#"):
            if previous is not None and previous[0].comment and indent > previous[1]:
                previous[0].comment += " " + comment_text(line).strip()  # a trailing comment's continuation
            else:
                leading.append(comment_text(line).strip())
                previous = None
            continue
        item = ITEM_LINE.match(line)
        if item:
            text, comment = split_comment(item.group("rest"))
            if in_defaults:
                entry = DefaultsEntry(text=text, comment=comment)
                result.defaults.append(entry)
                previous = (entry, indent + 2)
            else:
                previous = None
            leading = []
            continue
        match = KEY_LINE.match(line)
        if not match:
            leading, previous = [], None
            continue
        key = match.group("key")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        raw, comment = split_comment(match.group("rest") or "")
        in_defaults = dotted == "defaults"
        if not in_defaults:
            if raw[:1] in ("|", ">"):  # a block scalar: its text lines are the value, not keys
                raw, block = "", indent
            entry_key = Key(path=dotted, raw=raw, comment=comment, leading=" ".join(leading))
            result.keys.append(entry_key)
            previous = (entry_key, indent + len(key))
        else:
            previous = None
        stack.append((indent, key))
        leading = []
    return result


# -- rendering ---------------------------------------------------------------------------------


def escape(text: str) -> str:
    """Prose for a Markdown page or table cell: no raw HTML, no emphasis, no column breaks; `code` kept as code."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a code span, as the comment wrote it
            out.append(part)  # a pipe inside a code span does not split a table cell
            continue
        part = part.replace("\\", "\\\\").replace("<", "&lt;").replace(">", "&gt;")
        out.append(part.replace("*", "\\*").replace("|", "\\|").replace("_", "\\_").replace("`", "\\`"))
    return "".join(out)


def code(text: str) -> str:
    """Inline code (a pipe inside it does not split a table cell)."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def lookup(data: Any, dotted: str) -> Any:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def value_cell(key: Key, data: Any) -> str:
    if key.raw:
        text = key.raw
    else:
        value = lookup(data, key.path)
        if isinstance(value, dict) or value is None:
            return "(mapping)" if isinstance(value, dict) else ""
        if isinstance(value, str):  # a block scalar
            return "(a block of text)"
        if isinstance(value, list):
            text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
            if len(text) > MAX_INLINE_VALUE:
                return f"(a list of {len(value)})"
        else:
            text = str(value)
    return code(text)


def header_markdown(lines: list[str]) -> list[str]:
    """Prose lines become a paragraph; indented lines (the commands) become a code block."""
    out: list[str] = []
    prose: list[str] = []
    commands: list[str] = []

    def flush_prose() -> None:
        if prose:
            out.extend([escape(" ".join(prose)), ""])
            prose.clear()

    def flush_commands() -> None:
        if commands:
            out.extend(["```bash", *commands, "```", ""])
            commands.clear()

    for line in lines:
        if line.startswith("  ") and line.strip():
            flush_prose()
            commands.append(line.strip())
        elif line.strip():
            flush_commands()
            prose.append(line.strip())
    flush_prose()
    flush_commands()
    return out


def description(key: Key) -> str:
    return escape(key.comment or key.leading)


def keys_table(config: ConfigFile, prefix: str) -> list[str]:
    if not config.keys:
        return []
    rows = ["| key | value | description |", "| --- | --- | --- |"]
    for key in config.keys:
        rows.append(f"| {code(prefix + key.path)} | {value_cell(key, config.data)} | {description(key)} |")
    return rows + [""]


def defaults_table(config: ConfigFile) -> list[str]:
    if not config.defaults:
        return []
    rows = ["Defaults list:", "", "| # | entry | comment |", "| --- | --- | --- |"]
    for number, entry in enumerate(config.defaults, start=1):
        rows.append(f"| {number} | {code(entry.text)} | {escape(entry.comment)} |")
    return rows + [""]


@dataclass(frozen=True)
class Use:
    """A defaults entry that composes an option of a group: which file, under which package."""

    where: str
    group: str
    option: str
    package: str | None  # where its keys land, from the config's root (None: the group's own place)
    override: bool = False


def uses(configs: dict[str, list[ConfigFile]], primary: ConfigFile) -> list[Use]:
    """Every defaults entry of every file that picks an option of a group in the tree.

    A package in a defaults entry is relative to the package of the file that holds the entry (the
    group's name, unless the file says ``@package``); ``_here_`` is that package itself.
    """
    found: list[Use] = []
    everything = [("", primary)] + [(group, c) for group, files in configs.items() for c in files]
    for group, config in everything:
        own = "" if not group or config.package == "_global_" else (config.package or group.replace("/", "."))
        for entry in config.defaults:
            text = entry.text
            override = False
            if ":" in text:
                match = DEFAULTS_ENTRY.match(text)
                if not match or match.group("option") == "null":
                    continue
                name = match.group("group")
                target = name[1:] if name.startswith("/") else "/".join(p for p in (group, name) if p)
                option, package, override = match.group("option"), match.group("package"), bool(match.group("override"))
            else:  # `name@package`: another option of the file's own group
                name, _, package = text.partition("@")
                if name == "_self_" or not group:
                    continue
                target, option, package = group, name, package or None
            if package == "_here_":
                package = own
            elif package and own:
                package = f"{own}.{package}"
            if target in configs:
                found.append(Use(where=relative(config.path), group=target, option=option, package=package or None,
                                 override=override))
    return found


def relative(path: Path) -> str:
    return path.relative_to(CONF).as_posix()


def render() -> str:
    primary = read_config(CONF / PRIMARY)
    groups = sorted(p.name for p in CONF.iterdir() if p.is_dir())
    configs = {g: [read_config(f) for f in sorted((CONF / g).glob("*.yaml"))] for g in groups}
    chosen = {}
    for entry in primary.defaults:
        match = DEFAULTS_ENTRY.match(entry.text)
        if match:
            chosen[match.group("group")] = match.group("option")
    all_uses = uses(configs, primary)

    out = [
        "# Config reference",
        "",
        "<!-- Generated by scripts/docs_config_reference.py from refusal_lab/conf/. Do not edit by hand:",
        "     run `python scripts/docs_config_reference.py`; `--check` fails when this page is stale. -->",
        "",
        "Every config group under `refusal_lab/conf/`, every option in it and every key it sets, with the",
        "comment the YAML file gives it. How to pick options and change keys on the command line is in",
        "[Configuration](../configuration.md).",
        "",
        "Where a key lands: an option file's keys go under its group's name (`quant/4bit.yaml`'s `bits` is",
        "`quant.bits`) unless the file starts with `# @package _global_`, whose keys are written from the root",
        "of the config (`experiment.name`, `prompts.split`, `hydra.sweeper.params`). An entry",
        "`/group@package: option` in a defaults list composes an option somewhere else; the tables below say",
        "where each group is composed from.",
        "",
        "## Groups at a glance",
        "",
        "| group | options | in the primary defaults list | also composed by |",
        "| --- | --- | --- | --- |",
    ]
    for group in groups:
        options = ", ".join(f"[`{c.path.stem}`](#{anchor(group, c.path.stem)})" for c in configs[group])
        default = chosen.get(group)
        primary_cell = "not listed" if group not in chosen else ("`null` (off unless chosen)" if default == "null" else f"`{default}`")
        elsewhere = sorted({u.where for u in all_uses if u.group == group and u.where != PRIMARY})
        out.append(f"| `{group}` | {options} | {primary_cell} | {', '.join(f'`{w}`' for w in elsewhere)} |")
    out += ["", f"## The primary config: `{PRIMARY}`", ""]
    out += header_markdown(primary.header)
    out += defaults_table(primary)
    out += ["Top-level keys:", ""] + keys_table(primary, "")

    for group in groups:
        out += [f"## `{group}`", ""]
        for config in configs[group]:
            name = config.path.stem
            out += [f"### `{group}/{name}.yaml` {{ #{anchor(group, name)} }}", ""]
            marks = []
            if chosen.get(group) == name:
                marks.append("the default of the primary config")
            where = [u for u in all_uses if u.group == group and u.option == name and u.where != PRIMARY]
            for use in where:
                verb = "chosen (as an override of the default) by" if use.override else "composed by"
                marks.append(f"{verb} `{use.where}`" + (f" at `{use.package}`" if use.package else ""))
            if marks:
                out += ["Used as: " + "; ".join(marks) + ".", ""]
            out += header_markdown(config.header)
            if config.package == "_global_":
                prefix = ""
                out += ["`# @package _global_`: its keys are written from the root of the config.", ""]
            elif config.package:
                prefix = config.package + "."
                out += [f"`# @package {config.package}`: its keys land under `{config.package}`.", ""]
            else:
                prefix = group.replace("/", ".") + "."
            out += defaults_table(config)
            table = keys_table(config, prefix)
            out += table if table else ["It sets no keys of its own.", ""]
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def anchor(group: str, option: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{group}-{option}".lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from what would be generated")
    parser.add_argument("--output", type=Path, default=PAGE, help=f"where the page goes (default: {PAGE.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current == text:
            print(f"{args.output} is up to date")
            return 0
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(args.output), "generated", lineterm="", n=1)
        print("\n".join(list(diff)[:60]))
        print(f"{args.output} is out of date: run python scripts/docs_config_reference.py", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
