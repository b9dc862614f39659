"""A Spout session's frames: read from one Spout sender, published as another (bridge/spout.py).

Spout is one of the engine-side endpoints of engine/endpoints.py (SpoutSource, SpoutSink),
which says which thread owns them and why; this module keeps the name the server and
tests have used for a Spout session's thread.

A session with transport "spout" takes no frames from a host. The engine reads the
sender named by the session's spout_input ("" for Spout's active sender) and publishes
the finished frames as the sender named by spout_output, at the session's size, in
Spout's own texture format (bgra8). Frames of another size are fitted to that size as
the session's `fit` parameter says. Spout's OpenGL context belongs to the thread that
made it, and the receiver's serves the sender too: so the receiver is made first and
closed last, on the session's own thread.
"""

from __future__ import annotations

from typing import Callable

from .endpoints import EndpointSessionIO, SpoutSink, SpoutSource, fit_frame  # noqa: F401 - fit_frame: as before
from .session import Session


class SpoutSessionIO(EndpointSessionIO):
    """A Spout session's thread: start(), then stop() when the session closes."""

    def __init__(self, session: Session, frames_ready: Callable[[], None]):
        routes = session.routes
        super().__init__(session, frames_ready, SpoutSource(routes["spout_input"]), [SpoutSink(routes["spout_output"])])
