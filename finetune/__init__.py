"""Stage 2: benchmark any timm-loadable weights against ImageNet and random initialisation."""
