"""Text drawn into video frames with a built-in 5x7 pixel font: numpy only, no font files or
ffmpeg filters (PyAV's ffmpeg may lack drawtext). The demo's overlay of frame rate and latency.
Capitals, digits and a little punctuation; lower case is drawn as capitals, anything else as '?'."""

from __future__ import annotations

import numpy as np

GLYPH_HEIGHT, GLYPH_WIDTH = 7, 5
_FONT = {  # each glyph: its 7 rows, '#' lit
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    " ": "..... ..... ..... ..... ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "/": "....# ....# ...#. ..#.. .#... #.... #....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
}
GLYPHS = {char: np.array([[pixel == "#" for pixel in row] for row in rows.split()]) for char, rows in _FONT.items()}


def text_mask(lines: list[str], scale: int = 1) -> np.ndarray:
    """The lines as a bool picture, a pixel of space between characters and between lines,
    each font pixel scale x scale, with a margin of one font pixel all round."""
    pitch_y, pitch_x = GLYPH_HEIGHT + 1, GLYPH_WIDTH + 1
    mask = np.zeros((len(lines) * pitch_y + 1, max(map(len, lines), default=0) * pitch_x + 1), bool)
    for row, line in enumerate(lines):
        for column, char in enumerate(line.upper()):
            top, left = 1 + row * pitch_y, 1 + column * pitch_x
            mask[top:top + GLYPH_HEIGHT, left:left + GLYPH_WIDTH] = GLYPHS.get(char, GLYPHS["?"])
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def draw_text(image: np.ndarray, lines: list[str], top: int, left: int, scale: int = 1) -> None:
    """Draw lines in white on a darkened box whose top-left corner is (top, left), in place,
    so they read on any picture; what falls outside the image is cut off."""
    mask = text_mask(lines, scale)
    top, left = max(top, 0), max(left, 0)
    height, width = min(mask.shape[0], image.shape[0] - top), min(mask.shape[1], image.shape[1] - left)
    if height <= 0 or width <= 0:
        return
    box = image[top:top + height, left:left + width]
    box //= 3
    box[mask[:height, :width]] = 255
