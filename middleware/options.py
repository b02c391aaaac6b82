"""The operator's options of the storage tier: names, defaults and meanings.

Shared by the filter's ``[filter:hapi]`` section, the standalone server's
``[hapi]`` section and ``hapi-server --help``; parsed by
:mod:`hapi.middleware.settings`. Importable without torch, so that
``hapi-server --help`` answers at once.
"""

OPTION_DEFAULTS = {
    "device": "auto",
    "max_batch": 256,
    "default_batch": 32,
    "max_concurrent": 4,
    "threads": 0,
    "weights_dir": "",
    "max_shard_bytes": 1 << 28,
    "max_image_pixels": 40_000_000,
    "max_cached_models": 4,
    "models": "",
    "memory_budget": "auto",
    "queue_timeout": 10,
    "min_batch": 1,
    "feature_cache_container": "",
    "feature_cache_max_bytes": "10G",
}

OPTION_HELP = {
    "device": "where the frozen layers run: auto (the first CUDA device, else the CPU), "
              "cpu, cuda or cuda:N",
    "max_batch": "largest storage batch (samples per frame) a request may ask for",
    "default_batch": "storage batch of a request that does not ask for one",
    "max_concurrent": "feature requests in progress at once; more get 503 with Retry-After",
    "threads": "torch intra-op threads (0: torch's default); frames computed at once are "
               "the cores over this",
    "weights_dir": "folder of operator weight files that 'file:' references may name "
                   "(empty: 'file:' refused)",
    "max_shard_bytes": "largest shard object a request may have processed (413 above)",
    "max_image_pixels": "largest image, in pixels, before or after the preset's resize (422)",
    "max_cached_models": "models kept loaded; the least recently used is dropped beyond this",
    "models": "comma-separated models to serve (empty: every model of the zoo)",
    "memory_budget": "bytes the cached models and requests may hold (k/M/G/T suffix), or "
                     "auto: free GPU memory less 10%, or half the available memory on the CPU",
    "queue_timeout": "seconds a request waits for memory in the FIFO queue before a 503",
    "min_batch": "smallest storage batch a request is reduced to before it waits for memory",
    "feature_cache_container": "container, in each shard's own account, where extracted "
                               "features are kept and reused while the shard is unchanged "
                               "(empty: no feature cache)",
    "feature_cache_max_bytes": "bytes the feature cache container may hold in an account "
                               "(k/M/G/T suffix); no entry is written beyond it",
}
