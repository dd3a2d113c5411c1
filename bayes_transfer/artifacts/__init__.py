"""Prior artifacts: a learned prior as a directory (or one packed file) you publish and
read like pretrained weights.

    from bayes_transfer.artifacts import save_prior, read_prior, pack_artifact
    path = save_prior(prior, "priors/my-prior", metadata={"architecture": {...}})
    prior = read_prior(path, model_params=nnx.state(model, nnx.Param))
    pack_artifact(path, "my-prior.tar.gz")          # one reproducible file for a URL

Modules: :mod:`.format` (layout, metadata schema, validation, digests), :mod:`.arrays`
(the array files), :mod:`.tar` (packing, safe extraction), :mod:`.io` (the functions
below). To load a prior by registered name, path or URL use
:func:`bayes_transfer.load_prior` (the hub).
"""
from bayes_transfer.artifacts.format import (ARRAYS_DIR, FORMAT, FORMAT_VERSION, METADATA_FILE,
                                             RESERVED_KEYS, USER_KEYS, metadata_digest)
from bayes_transfer.artifacts.io import (check_destination, pack_artifact, read_metadata,
                                         read_prior, save_prior, unpack_artifact,
                                         verify_artifact)
from bayes_transfer.errors import (ArtifactError, ArtifactIntegrityError, ArtifactVersionError,
                                   PriorError, SpecMismatchError)

# old name (bayes_transfer.artifact.load_prior), kept until its callers use read_prior
load_prior = read_prior

__all__ = ["save_prior", "read_prior", "verify_artifact", "read_metadata", "pack_artifact",
           "unpack_artifact", "metadata_digest", "check_destination", "FORMAT",
           "FORMAT_VERSION", "METADATA_FILE", "ARRAYS_DIR", "USER_KEYS", "RESERVED_KEYS",
           "ArtifactError", "ArtifactIntegrityError", "ArtifactVersionError", "PriorError",
           "SpecMismatchError"]
