"""Callbacks of the component's Script TOP (stream): each cook hands the input to the
extension and shows its newest picture."""


def onCook(scriptOp):
    scriptOp.parent().ext.StreamDiffusionExt.Cook(scriptOp)
