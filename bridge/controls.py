"""What TouchDesigner's and OBS's controls for the session parameters share, from the table.

Each host builds its own widgets from bridge/params.py (td_components/streamdiffusion_params.py,
obs_scripts/streamdiffusion.py); what would otherwise be written twice is here: which
parameters a host shows, the help and menu entries a control carries, the models a host
offers, and how lists of pairs (weighted prompts, LoRA adapters) are read from a host's rows of text.

Standard library only, as bridge/params.py: a host imports it before anything else is on its path.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from .params import PAIR_KINDS, Param, in_group

# The table's groups a host shows as controls. Model (the model's size) is the engine's
# business; Spout's sender names belong to a host's Spout transport, where it has one.
HOST_GROUPS = ("Prompt", "Style", "Stream", "Targets", "Output")
# The model presets `python -m engine serve --model` knows (engine/config.py's PRESETS, which
# hosts cannot import: it needs torch; tests/test_host_controls.py checks they agree).
MODELS = ("wan2.1-1.3b", "wan2.1-14b", "tiny")


def host_params() -> tuple[Param, ...]:
    """The parameters a host shows, in the table's order."""
    return in_group(*HOST_GROUPS)


def help_text(param: Param) -> str:
    """A control's help: the table's line, and the unit its value is in."""
    return f"{param.help} In {param.unit}." if param.unit else param.help


def menu(param: Param) -> list[tuple[str, str]]:
    """A choice parameter's menu entries: (value, label)."""
    return [(choice, choice.capitalize()) for choice in param.choices]


def pairs(rows: Iterable[Sequence[str]], param: Param, header: bool = False) -> list[list]:
    """A pair parameter's value (weighted prompts [text, weight], LoRA adapters [name, scale])
    from a host's rows of (text, number) cells. Rows without text are left out and a missing
    or empty number is 1. A number that is not one is a ValueError, but for the first row's
    when the rows may have a header (its column names)."""
    number_word = PAIR_KINDS[param.kind].number
    found = []
    for index, row in enumerate(rows):
        cells = [cell.strip() for cell in row]
        if not cells or not cells[0]:
            continue
        number = cells[1] if len(cells) > 1 and cells[1] else "1"
        try:
            found.append([cells[0], float(number)])
        except ValueError:
            if header and index == 0:
                continue  # the column names
            raise ValueError(f"the {number_word} {number!r} of {cells[0]!r} is not a number") from None
    return found
