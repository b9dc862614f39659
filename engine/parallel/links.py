"""Messages between two ranks: a header (a dict, as JSON) and named tensors.

Headers travel over a gloo group on the CPU; tensors over the data group (NCCL on
GPUs, the same gloo group on CPUs). Sends are asynchronous and in order, so a rank
computes the next forward while the last one travels.
"""

from __future__ import annotations

import json
from collections import deque

import torch
import torch.distributed as dist


class Link:
    """Ordered messages to and from one other rank: a header (a dict, as JSON, over
    the control group on the CPU) and named tensors (over the data group: NCCL on
    GPUs). Sends are asynchronous; once more than ``max_in_flight`` are unfinished,
    ``send`` waits for the oldest. Their tensors are kept alive until sent."""

    def __init__(self, peer: int, *, device: torch.device, control_group=None, data_group=None,
                 max_in_flight: int = 2):
        self.peer, self.device = peer, device
        self.control_group, self.data_group = control_group, data_group
        self.max_in_flight = max_in_flight
        # gloo moves CPU tensors only: ranks that share a GPU over gloo send through host memory.
        self.via_host = device.type == "cuda" and dist.get_backend(data_group) == "gloo"
        self.sending: deque[tuple[list, list[torch.Tensor]]] = deque()
        self.size = torch.zeros(1, dtype=torch.int64)

    def send(self, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        tensors = {name: t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()
                   for name, t in (tensors or {}).items()}
        if self.via_host:
            tensors = {name: t.cpu() for name, t in tensors.items()}
        described = {**header, "tensors": [(name, list(t.shape), str(t.dtype).removeprefix("torch."))
                                           for name, t in tensors.items()]}
        body = torch.frombuffer(bytearray(json.dumps(described).encode()), dtype=torch.uint8)
        size = torch.tensor([body.numel()], dtype=torch.int64)
        works = [dist.isend(size, self.peer, group=self.control_group),
                 dist.isend(body, self.peer, group=self.control_group)]
        works += [dist.isend(t, self.peer, group=self.data_group) for t in tensors.values()]
        self.sending.append((works, [size, body, *tensors.values()]))
        while len(self.sending) > self.max_in_flight:
            for work in self.sending.popleft()[0]:
                work.wait()

    def recv(self) -> tuple[dict, dict[str, torch.Tensor]]:
        dist.recv(self.size, self.peer, group=self.control_group)
        body = torch.empty(int(self.size), dtype=torch.uint8)
        dist.recv(body, self.peer, group=self.control_group)
        header = json.loads(body.numpy().tobytes())
        tensors = {}
        for name, shape, dtype in header.pop("tensors"):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device="cpu" if self.via_host else self.device)
            dist.recv(tensor, self.peer, group=self.data_group)
            tensors[name] = tensor.to(self.device, non_blocking=True) if self.via_host else tensor
        return header, tensors

    def flush(self) -> None:
        while self.sending:
            for work in self.sending.popleft()[0]:
                work.wait()
