"""Callbacks of the component's Execute DAT (frame_start), with Frame Start and Exit on.
`me` is this DAT, as TouchDesigner binds it in every DAT's module."""


def onFrameStart(frame):
    me.parent().ext.StreamDiffusionExt.OnFrameStart()  # noqa: F821


def onExit():
    me.parent().ext.StreamDiffusionExt.Shutdown()  # noqa: F821
