"""One module per foreign library, each importing that library only when used: :mod:`.deepspeed` (also reachable
as ``adamhd_dist.deepspeed``), :mod:`.transformers` (the Trainer callback) and :mod:`.accelerate`."""
