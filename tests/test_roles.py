"""Each role installs only what it needs (setup.cfg's extras): the modules of
one role never import another role's dependencies."""

import subprocess
import sys

import pytest

# What each role's entry points import, and what they must not bring in.
ROLES = {
    "proxy": (["hapi.middleware.filter"],
              ["matplotlib", "sklearn", "aiohttp", "swiftclient", "hapi.client"]),
    "one-node cluster": (["hapi.server_setup.cluster"],
                         ["matplotlib", "sklearn", "aiohttp", "hapi.client"]),
    "server": (["hapi.middleware.server"],
               ["matplotlib", "sklearn", "eventlet", "swift", "swiftclient", "hapi.client"]),
    "trainer": (["hapi.client.main", "hapi.client.train", "hapi.client.data",
                 "hapi.client.autosplit", "hapi.client_setup.load"],
                ["eventlet", "swift", "aiohttp", "hapi.middleware"]),
}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_a_role_imports_nothing_of_the_others(role):
    modules, forbidden = ROLES[role]
    code = (f"import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"print(sorted(m for m in {forbidden!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", f"{role} imports {out.strip()}"
