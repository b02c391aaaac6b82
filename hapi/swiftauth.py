"""Swift credentials from explicit values and the environment, in the order of
python-swiftclient's own ``swift`` command.

Each value is taken from the first of: the value given (a command-line flag),
the ``ST_*`` variable, the ``OS_*`` value given, the ``OS_*`` variable:

=============  ==========  =======================  ==================
value          flag        ``ST_*``                 ``OS_*``
=============  ==========  =======================  ==================
auth URL       ``auth``    ``ST_AUTH``              ``OS_AUTH_URL``
user           ``user``    ``ST_USER``              ``OS_USERNAME``
key            ``key``     ``ST_KEY``               ``OS_PASSWORD``
auth version   given       ``ST_AUTH_VERSION``      ``OS_AUTH_VERSION``,
                                                    ``OS_IDENTITY_API_VERSION``
=============  ==========  =======================  ==================

The auth version defaults to 1.0 (tempauth), or to 3 (Keystone) when the
auth URL came from ``OS_AUTH_URL``. A storage URL and token
(``OS_STORAGE_URL``, ``OS_AUTH_TOKEN``) are used first when both are there,
as with the ``swift`` command; the key, when there is one, then renews an
expired token.
"""

import os

# Keystone options of python-swiftclient's ``os_options``: key -> variables, first wins.
_OS_OPTIONS = {
    "project_name": ("OS_PROJECT_NAME", "OS_TENANT_NAME"),
    "user_domain_name": ("OS_USER_DOMAIN_NAME",),
    "project_domain_name": ("OS_PROJECT_DOMAIN_NAME",),
    "region_name": ("OS_REGION_NAME",),
}


class CredentialsError(ValueError):
    """The credentials are missing or incomplete; the message names what to give."""


def connection_options(*, auth=None, user=None, key=None, auth_version=None,
                       os_auth_url=None, os_username=None, os_password=None, os_options=None,
                       storage_url=None, token=None, environ=None):
    """Keyword arguments for ``swiftclient.client.Connection``, by the module's order.

    Raises :class:`CredentialsError` when there is neither an auth URL, user
    and key nor a storage URL and token.
    """
    env = os.environ if environ is None else environ
    from_os = not (auth or env.get("ST_AUTH"))
    auth = auth or env.get("ST_AUTH") or os_auth_url or env.get("OS_AUTH_URL")
    user = user or env.get("ST_USER") or os_username or env.get("OS_USERNAME")
    key = key or env.get("ST_KEY") or os_password or env.get("OS_PASSWORD")
    storage_url = storage_url or env.get("OS_STORAGE_URL")
    token = token or env.get("OS_AUTH_TOKEN")
    has_token = bool(storage_url and token)
    if not (auth and user and key) and not has_token:
        missing = [name for name, value in (("auth URL (ST_AUTH or OS_AUTH_URL)", auth),
                                            ("user (ST_USER or OS_USERNAME)", user),
                                            ("key (ST_KEY or OS_PASSWORD)", key)) if not value]
        raise CredentialsError(
            f"no Swift credentials: missing the {', the '.join(missing)}; give an auth URL, "
            "user and key, or a storage URL and token (OS_STORAGE_URL, OS_AUTH_TOKEN)")
    version = auth_version or env.get("ST_AUTH_VERSION") or env.get("OS_AUTH_VERSION") \
        or env.get("OS_IDENTITY_API_VERSION") or ("3" if from_os and auth else "1.0")
    options = {"authurl": auth, "user": user, "key": key, "auth_version": version}
    keystone = {name: (os_options or {}).get(name) or next(
                    (env[var] for var in variables if env.get(var)), None)
                for name, variables in _OS_OPTIONS.items()}
    keystone = {name: value for name, value in keystone.items() if value}
    if keystone:
        options["os_options"] = keystone
    if has_token:
        options.update(preauthurl=storage_url, preauthtoken=token)
    return options
