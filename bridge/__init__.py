"""What host applications import to talk to the engine: light (numpy, pyzmq, msgpack), never torch.

    bridge.params     the session parameter table: names, kinds, defaults, bounds, help
    bridge.controls   what hosts' controls share, from the table (standard library only)
    bridge.protocol   message and frame-header schema, validation, error codes
    bridge.shm        shared-memory frame ring
    bridge.zmq_io     ZeroMQ sockets for control and frames
    bridge.client     EngineClient: a session on the engine for a host application
    bridge.background BackgroundClient: that session on a thread of its own, one status
    bridge.launcher   EngineProcess: start an engine, know when it answers, stop it

Import the module you need; this package imports nothing itself, so loading the
protocol alone does not load ZeroMQ.
"""
