"""The tensors alive in this process, as the memory tests count them."""

import gc

import torch


def tensor_storages() -> tuple[int, int]:
    """(tensors alive, bytes of their storages, each storage once), found by walking Python's
    objects, which tracemalloc does not see into. Tensors without memory of their own are left
    out: sparse and meta ones, and the fake tensors torch.compile keeps in its caches."""
    gc.collect()
    tensors, storages = 0, {}
    for thing in gc.get_objects():
        # type(), not isinstance(): some of torch's deprecated objects warn when asked their __class__
        if not issubclass(type(thing), torch.Tensor) or thing.layout != torch.strided or thing.is_meta:
            continue
        try:
            storage = thing.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        except RuntimeError:  # "Cannot access data pointer": a fake tensor
            continue
        tensors += 1
    return tensors, sum(storages.values())
