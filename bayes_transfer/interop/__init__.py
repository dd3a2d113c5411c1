"""Interoperability with PyTorch: read ``.pt`` files safely, import reference priors.

- :mod:`~bayes_transfer.interop.torch_reader`: a restricted unpickler for ``torch.save``
  files (no torch needed, no pickled code run).
- :mod:`~bayes_transfer.interop.torch_layout`: the map between torchvision's flat
  parameter order and a prior's ParamSpec.
- :mod:`~bayes_transfer.interop.torch_prior`: the reference priors' conversion
  (:func:`import_torch_prior`) and backbone weights (:func:`import_torch_weights`).
"""
from bayes_transfer.interop.torch_layout import (SUPPORTED_ARCHS, ParamMap, ReferenceLayout,
                                                 reference_layout)
from bayes_transfer.interop.torch_prior import (CONVENTIONS, REFERENCE_FILES, convert_reference,
                                                import_torch_prior, import_torch_weights,
                                                reference_files)

__all__ = ["CONVENTIONS", "REFERENCE_FILES", "SUPPORTED_ARCHS", "ParamMap", "ReferenceLayout",
           "convert_reference", "import_torch_prior", "import_torch_weights", "reference_files",
           "reference_layout"]
