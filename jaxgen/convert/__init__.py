"""Importers of published weights into jaxgen modules, using numpy and safetensors, not torch.

`jaxgen.convert.diffusers`: UNet2DModel, UNet2DConditionModel and AutoencoderKL folders/state dicts.
"""
