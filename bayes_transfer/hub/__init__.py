"""The prior hub: load a published prior by name, path or URL, verified, in one line.

    from bayes_transfer import hub
    prior = hub.load_prior("fashion-mnist/small-cnn")     # built in: works offline
    prior = hub.load_prior("hf://my-lab/my-prior@<commit>")   # Hugging Face ([hf] extra)
    for entry in hub.list_priors():                       # built-in + $BAYES_TRANSFER_REGISTRY
        print(entry.name, entry.description)

Modules: :mod:`.api` (load_prior, download, verify, list_priors, status, show,
register_prior), :mod:`.publish` (pack_prior, publish_prior), :mod:`.registry`
(registries: the built-in one, the user's, merging, writing, PUBLISH_BASE_URL),
:mod:`.fetch` (URLs, the download cache, verified atomic downloads) and :mod:`.hf`
(``hf://`` references through huggingface_hub)."""
from bayes_transfer.hub.api import (download, list_priors, load_prior, register_prior, show,
                                    status, verify)
from bayes_transfer.hub.fetch import (DEFAULT_TIMEOUT, ENV_CACHE, ENV_OFFLINE,
                                      default_cache_dir)
from bayes_transfer.hub.publish import PackedArtifact, Published, pack_prior, publish_prior
from bayes_transfer.hub.registry import (BUILTIN_REGISTRY, DEFAULT_REGISTRY, ENV_REGISTRY,
                                         PUBLISH_BASE_URL, REGISTRY_FORMAT, REGISTRY_VERSION,
                                         Registry, RegistryEntry, default_registries,
                                         default_registry, load_registry, published_url)

__all__ = ["load_prior", "download", "verify", "list_priors", "show", "status",
           "register_prior", "pack_prior", "publish_prior", "PackedArtifact", "Published",
           "load_registry", "default_registry", "default_registries", "Registry", "RegistryEntry",
           "default_cache_dir", "published_url", "BUILTIN_REGISTRY", "DEFAULT_REGISTRY",
           "REGISTRY_FORMAT", "REGISTRY_VERSION", "ENV_REGISTRY", "ENV_CACHE", "ENV_OFFLINE",
           "DEFAULT_TIMEOUT", "PUBLISH_BASE_URL"]
