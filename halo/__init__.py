"""HALO: distil a pretrained Qwen3 Transformer into a HypeNet hybrid model.

Stages (``halo <stage>``, see ``halo.cli``): align (stage 1), select, distill (stage 2), finetune
(stage 3), export, alpha; ``halo run`` does them all and ``halo demo`` runs them on a shipped tiny
teacher. Building blocks: ``halo.losses`` (fused chunked KL / CE), ``halo.train`` (the training
loop), ``halo.data`` (corpus, packing, passkey sequences), ``halo.evals``.
"""
