"""One module per foreign library, each importing that library only when used: :mod:`.deepspeed` (also reachable
as ``adamhd_dist.deepspeed``; Accelerate's DeepSpeed plugin uses its ``attach``) and :mod:`.transformers` (the
Trainer callback). Accelerate's FSDP2 plugin needs nothing: AdamHD adopts the DTensors it swaps in."""
