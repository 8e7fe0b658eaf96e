"""Data: the synthetic COCO-format generator (``synthetic``), the COCO dataset (``coco``),
augmentation (``transforms``) and config-driven datasets/loaders (``loader``).

Import the submodules directly; this package stays import-light so that the synthetic
generator's worker processes do not load torch.
"""
