"""Callbacks of the component's Parameter Execute DAT (parameter_changes), which watches
the component's own custom parameters."""


def onValueChange(par, prev):
    par.owner.ext.StreamDiffusionExt.OnParameterChange(par)


def onPulse(par):
    par.owner.ext.StreamDiffusionExt.OnPulse(par)
