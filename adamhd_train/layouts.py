"""Suggested model-parallel layouts of the large GPT-3 sizes on nodes of 8 GPUs (standard library only:
``launch/slurm/plan.py`` loads this file by path, outside the job's Python environment).

The rule is Megatron-LM's (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters"): tensor parallelism inside a node (its 8 GPUs share NVLink; tp must divide the heads), pipeline stages
across nodes only where one node's 8 GPUs cannot hold a replica (16 bytes per parameter for bf16 weights and
gradients with fp32 master weights and Adam moments, before activations), and data parallelism over the rest.
The launcher checks and prints these layouts; it runs --tp above 1 with --fsdp (FSDP2 over tensor parallelism),
not yet --pp above 1 (nor --tp with --deepspeed).
"""

GPUS_PER_NODE = 8

SUGGESTED_LAYOUTS = {
    # model: (tp, pp, why)
    "gpt3-13b": (8, 1, "13B × 16 bytes / 8 GPUs = 26 GB of weights and optimizer state per GPU: one node holds "
                       "a replica, so no pipeline"),
    "gpt3-175b": (8, 16, "175B × 16 bytes = 2.8 TB: 16 stages of 6 of the 96 blocks over 16 nodes, 22 GB per "
                         "GPU"),
}
"""tp × pp per model; dp is the GPUs over tp · pp (a multiple of ``GPUS_PER_NODE // tp`` nodes per replica)."""


def suggested_layout(model, gpus):
    """The suggested ``(tp, pp, dp, why)`` of ``model`` on ``gpus`` GPUs in nodes of 8, or None for a size
    without a suggestion (the smaller ones train data parallel) or a GPU count that holds no whole replica."""
    entry = SUGGESTED_LAYOUTS.get(model)
    if entry is None:
        return None
    tp, pp, why = entry
    if gpus < tp * pp or gpus % (tp * pp):
        return None
    return tp, pp, gpus // (tp * pp), why


def describe_layout(model, gpus=None):
    """One line: the suggested layout of ``model`` (at ``gpus`` GPUs, or its smallest: one replica), or ''."""
    entry = SUGGESTED_LAYOUTS.get(model)
    if entry is None:
        return ""
    tp, pp, why = entry
    replica = tp * pp
    if gpus is None or suggested_layout(model, gpus) is None:
        at = (f"; {gpus} GPUs hold no whole number of replicas of {replica}" if gpus is not None else "")
        return (f"suggested layout for {model} on {GPUS_PER_NODE}-GPU nodes: tp {tp} × pp {pp} × dp N "
                f"({replica} GPUs = {replica // GPUS_PER_NODE} node(s) per replica{at}); {why}")
    return (f"suggested layout for {model} on {gpus} GPUs in {GPUS_PER_NODE}-GPU nodes: tp {tp} × pp {pp} × dp "
            f"{gpus // replica}; {why}")
