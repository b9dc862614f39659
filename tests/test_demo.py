"""`python -m engine demo`: which model --model auto picks and why, the report's word on the
tiny model, and a video of each output beside its input, captioned."""

import av
import numpy as np
import pytest
import torch

from bridge.client import Output
from engine import cli, demo
from engine.captions import GLYPHS, draw_text, text_mask
from engine.models import weights


def test_the_demo_shows_input_beside_output_and_says_the_tiny_model_is_noise(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))  # the engine's log
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto picks tiny on any machine
    video = tmp_path / "demo.mp4"
    cli.main(["demo", "--frames", "40", "--size", "128x96", "--output", str(video)])

    said = capsys.readouterr().out
    assert "model: tiny, not wan2.1-1.3b: there is no CUDA GPU here" in said
    assert f"note: {demo.TINY_IS_NOISE}" in said
    assert "the tiny model has random weights: the picture is noise by design" in said
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (2 * 128, 96)  # input | output
        assert stream.frames >= 2


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_streams_the_real_model_where_a_gpu_and_its_weights_are(cuda, monkeypatch, capsys):
    monkeypatch.setattr(weights, "locate_weights", lambda preset, folder=None, **kwargs: "found")
    assert demo.choose_model("auto", None, download=False) == "wan2.1-1.3b"
    assert "model: wan2.1-1.3b (a CUDA GPU is here, and its weights)" in capsys.readouterr().out


def test_auto_without_the_weights_streams_tiny_and_says_how_to_get_them(cuda, monkeypatch, capsys):
    def missing(preset, folder=None, **kwargs):
        raise weights.WeightsNotFound(f"the {preset} weights are not in the Hugging Face cache (LocalEntryNotFound).\n"
                                      "Fetch them with ...")
    monkeypatch.setattr(weights, "locate_weights", missing)
    assert demo.choose_model("auto", None, download=False) == "tiny"
    said = capsys.readouterr().out
    assert "model: tiny, not wan2.1-1.3b: the wan2.1-1.3b weights are not in the Hugging Face cache" in said
    assert "`python dev.py demo --download`" in said


def test_auto_with_download_fetches_the_weights_first(cuda, monkeypatch, capsys):
    fetched = []
    monkeypatch.setattr(weights, "download_weights", lambda preset, taehv: fetched.append((preset, taehv)))
    assert demo.choose_model("auto", None, download=True) == "wan2.1-1.3b"
    assert fetched == [("wan2.1-1.3b", False)]


def test_auto_without_a_gpu_downloads_nothing_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(weights, "download_weights", lambda preset, taehv: pytest.fail("no GPU to use them"))
    assert demo.choose_model("auto", None, download=True) == "tiny"
    assert "no CUDA GPU here, which it needs (so nothing was downloaded)" in capsys.readouterr().out


def test_a_model_named_is_streamed_as_named(capsys):
    assert demo.choose_model("tiny", None, download=False) == "tiny"
    assert capsys.readouterr().out == "model: tiny\n"


def test_each_frame_is_captioned_with_its_rate_and_latency():
    inputs = np.full((3, 64, 128, 3), 200, np.uint8)
    arrivals = [demo.Arrival(Output(np.zeros((64, 128, 3), np.uint8), seq, 0, 250.0 + seq), seq, at)
                for seq, at in enumerate([0.0, 0.1, 0.2])]
    video = demo.side_by_side(inputs, arrivals, "tiny")
    assert video.shape == (3, 64, 256, 3)
    expected = np.zeros((64, 128, 3), np.uint8)
    draw_text(expected, ["OUTPUT: tiny", "10.0 FPS", "LATENCY 252 MS"], 2, 2)
    assert np.array_equal(video[2, :30, 128:], expected[:30])  # the output's caption, at the top
    assert not video[2, 30:40, 128:].any()  # the output itself, between its captions
    assert video[2, 40:, 128:].any()  # for tiny, the note at the bottom
    assert demo.frame_rates([0.0, 0.1, 0.2, 1.5]) == [None, 10.0, 10.0, None]


def test_the_font_has_a_distinct_glyph_for_each_character_and_cuts_text_at_the_edge():
    assert len({glyph.tobytes() for glyph in GLYPHS.values()}) == len(GLYPHS)
    image = np.full((9, 20, 3), 90, np.uint8)  # as tall as a line of text, too narrow for it
    draw_text(image, ["LATENCY 123 MS"], 0, 0)  # wider than the image
    assert set(np.unique(image)) == {30, 255}  # the box darkened, the letters white
    assert text_mask(["AB"], scale=2).shape == (2 * 9, 2 * 13)
