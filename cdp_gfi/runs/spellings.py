"""Flags as users type them: ``--batch_size`` and ``--batch-size`` are one flag in every script.

The CDP README spells stage 1's flags with underscores and stage 2's with
hyphens; users mix them. The parser registers the other spelling of each
multi-word long flag as an alias of the same argument; ``--help`` shows the
spelling the script declares.
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, List


def other_spelling(flag: str) -> str:
    """``--batch_size`` <-> ``--batch-size``; a short or one-word flag is its own other spelling."""
    if not flag.startswith("--"):
        return flag
    body = flag[2:]
    return "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


class DeclaredSpellingHelp(argparse.HelpFormatter):
    """Help that lists each flag as declared, not its automatic alias."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        aliases = getattr(action, "aliases", ())
        if aliases:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in aliases]
        return super()._format_action_invocation(action)


class BothSpellingsParser(argparse.ArgumentParser):
    """An ArgumentParser whose multi-word long flags also parse in the other spelling (same ``dest``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DeclaredSpellingHelp)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        """``add_argument``, plus the other spelling of every multi-word long flag not declared already."""
        taken = set(names) | set(self._option_string_actions)
        aliases: List[str] = []
        for name in names:
            other = other_spelling(name)
            if other not in taken:
                aliases.append(other)
                taken.add(other)
        action = super().add_argument(*names, *aliases, **kwargs)
        action.aliases = tuple(aliases)
        return action

    def format_help(self) -> str:
        """The help, ending with the rule about spellings (the aliases themselves are not listed)."""
        return super().format_help() + "\nEvery multi-word flag takes either spelling (--batch_size or --batch-size).\n"

    def _get_option_tuples(self, option_string: str) -> list:
        """Abbreviations: a prefix of both spellings of one flag is that flag, not an ambiguous option."""
        unique: dict = {}
        for option in super()._get_option_tuples(option_string):
            unique.setdefault(id(option[0]), option)
        return list(unique.values())
