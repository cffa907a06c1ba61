"""Every command and option of ``idistill`` has a help line."""

import argparse

from idistill_core.cli import build_parser


def _missing_help(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if choice.help}
            for name, sub in action.choices.items():
                if name not in helped:
                    missing.append(" ".join([*path, name]))
                missing += _missing_help(sub, [*path, name])
        elif not action.help:
            missing.append(" ".join([*path, *action.option_strings]))
    return missing


def test_every_command_and_option_has_a_help_line():
    assert _missing_help(build_parser(), ["idistill"]) == []
