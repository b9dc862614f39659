"""The engine process: StreamDiffusionV2 on torch. Host applications use `bridge` instead."""
