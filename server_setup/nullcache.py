"""The one-node cluster's ``cache`` filter: Swift's memcache interface with no
memcached behind it.

Swift's proxy expects the ``cache`` middleware (memcache) in its pipeline.
Without it, tempauth logs ``swift.cache could not be found in env!`` as an
error at every login; with Swift's own ``cache`` filter and no memcached
server, every request adds failed connection attempts to the log instead.
This filter puts a cache that never holds anything into ``swift.cache``:
every lookup misses, so the proxy and tempauth behave as they do without a
cache (account and container info read per request, fernet tokens), and the
log stays clean. A deployment with memcached uses Swift's ``cache`` filter.
"""

CACHE_ENV_KEY = "swift.cache"


class NullCache:
    """The methods of ``swift.common.memcached.MemcacheRing`` that the proxy
    and its middleware call: every get misses, every write is dropped."""

    def get(self, key, raise_on_error=False):
        return None

    def get_multi(self, keys, server_key):
        return [None] * len(keys)

    def set(self, key, value, serialize=True, time=0, min_compress_len=0,
            raise_on_error=False):
        return None

    def set_multi(self, mapping, server_key, serialize=True, time=0, min_compress_len=0):
        return None

    def delete(self, key, server_key=None):
        return None


class NullCacheMiddleware:
    def __init__(self, app):
        self.app = app
        self.cache = NullCache()

    def __call__(self, env, start_response):
        env[CACHE_ENV_KEY] = self.cache
        return self.app(env, start_response)


def filter_factory(global_conf, **local_conf):
    """Paste entry point (``paste.filter_factory = hapi.server_setup.nullcache:filter_factory``)."""
    return NullCacheMiddleware
