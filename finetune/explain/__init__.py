"""Explanations for benchmarked models: class-activation maps with sanity checks.

``cam`` (Grad-CAM via the grad-cam package; target layer and ViT reshape read from the model),
``rollout`` (attention rollout for timm ViTs), ``probe`` (the linear probe folded into a torch
head), ``sanity`` (Adebayo et al.'s model- and data-randomisation tests with a verdict in
words), ``localisation`` (pointing game, energy inside the box), ``grid`` (the PNG per init)
and ``run.explain_set``, which does all of it for one init.
"""

from finetune.explain.cam import conv_target, grad_cam, vit_of, vit_reshape
from finetune.explain.localisation import boxes_to_masks, energy_inside, pointing_game, resize_masks
from finetune.explain.probe import ProbeClassifier, fit_probe, permuted, probe_head
from finetune.explain.rollout import attention_rollout, unfused_attention
from finetune.explain.run import METHODS, explain_set
from finetune.explain.sanity import cascading_randomisation, compare_maps, data_randomisation

__all__ = ["METHODS", "ProbeClassifier", "attention_rollout", "boxes_to_masks",
           "cascading_randomisation", "compare_maps", "conv_target", "data_randomisation",
           "energy_inside", "explain_set", "fit_probe", "grad_cam", "permuted", "pointing_game",
           "probe_head", "resize_masks", "unfused_attention", "vit_of", "vit_reshape"]
