"""Parallelism applied to a megamoe model from outside it (the model imports no DeepSpeed).

build.py    the model built where it lives: meta layout, this rank's share materialised
            (dense weights, its EP slice of the experts), ZeRO-3 partitioned block by block.
expert.py   DeepSpeed AutoEP block derived from ModelConfig; initialize() runs megamoe's Router
            inside every expert-parallel layer; ep_layout() for the checkpoint guard.
deepspeed_compat.py  every patch of DeepSpeed internals, applied only on the supported version.
balance.py  aux-loss-free balancing: all-reduced token counts -> selection-bias update, once per
            optimizer step.
"""
