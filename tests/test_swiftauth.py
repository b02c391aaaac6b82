"""Swift credentials: flags, then ST_*, then OS_*, as python-swiftclient's ``swift`` command."""

import pytest
from swiftclient import Connection

from hapi.swiftauth import CredentialsError, connection_options

ST = {"ST_AUTH": "http://st/auth/v1.0", "ST_USER": "st:user", "ST_KEY": "st-key"}
OS = {"OS_AUTH_URL": "http://keystone/v3", "OS_USERNAME": "os-user", "OS_PASSWORD": "os-pw",
      "OS_PROJECT_NAME": "proj", "OS_USER_DOMAIN_NAME": "Default"}
TOKEN = {"OS_STORAGE_URL": "http://swift/v1/AUTH_x", "OS_AUTH_TOKEN": "tok"}


def password(options):
    return options["authurl"], options["user"], options["key"], options["auth_version"]


def test_flags_come_before_st_variables():
    options = connection_options(auth="http://flag/auth/v1.0", key="flag-key",
                                 environ={**ST, **OS})
    assert password(options) == ("http://flag/auth/v1.0", "st:user", "flag-key", "1.0")
    assert "preauthtoken" not in options


def test_st_variables_come_before_os_variables():
    assert password(connection_options(environ={**OS, **ST})) == (
        "http://st/auth/v1.0", "st:user", "st-key", "1.0")


def test_os_variables_alone_are_keystone_v3_with_its_options():
    options = connection_options(environ=OS)
    assert password(options) == ("http://keystone/v3", "os-user", "os-pw", "3")
    assert options["os_options"] == {"project_name": "proj", "user_domain_name": "Default"}


def test_os_values_given_fill_in_what_st_variables_lack():
    options = connection_options(os_username="given", os_password="pw",
                                 environ={"ST_AUTH": ST["ST_AUTH"], "OS_USERNAME": "env"})
    assert password(options) == (ST["ST_AUTH"], "given", "pw", "1.0")


def test_auth_version_from_the_environment():
    env = {**ST, "ST_AUTH_VERSION": "2.0", "OS_AUTH_VERSION": "3"}
    assert connection_options(environ=env)["auth_version"] == "2.0"
    assert connection_options(auth_version="1", environ=env)["auth_version"] == "1"


def test_a_token_comes_first_and_the_key_renews_it():
    options = connection_options(environ={**ST, **TOKEN})
    assert (options["preauthurl"], options["preauthtoken"]) == (
        "http://swift/v1/AUTH_x", "tok")
    assert password(options)[:3] == ("http://st/auth/v1.0", "st:user", "st-key")
    alone = connection_options(token="flag-tok", environ=TOKEN)
    assert alone["preauthtoken"] == "flag-tok" and alone["key"] is None


@pytest.mark.parametrize(("kwargs", "env", "missing"), [
    ({}, {}, "the auth URL (ST_AUTH or OS_AUTH_URL), the user (ST_USER or OS_USERNAME), "
             "the key (ST_KEY or OS_PASSWORD)"),
    ({"user": "a:b"}, {"ST_AUTH": "http://x"}, "the key (ST_KEY or OS_PASSWORD);"),
    ({}, {**ST, "OS_AUTH_TOKEN": "tok", "ST_KEY": ""}, "the key (ST_KEY or OS_PASSWORD);"),
])
def test_missing_credentials_are_named(kwargs, env, missing):
    with pytest.raises(CredentialsError) as err:
        connection_options(**kwargs, environ=env)
    assert str(err.value).startswith(f"no Swift credentials: missing {missing}")


# -- the trainer and hapi-load resolve alike -----------------------------------

CREDENTIAL_VARIABLES = (*ST, "ST_AUTH_VERSION", *OS, "OS_TENANT_NAME", "OS_PROJECT_DOMAIN_NAME",
                        "OS_REGION_NAME", "OS_AUTH_VERSION", "OS_IDENTITY_API_VERSION", *TOKEN)
# The same credentials as flags of each command: (trainer flag, hapi-load flag, value).
AUTH_FLAG = ("-A", "--auth", "http://flag/auth/v1.0")
USER_FLAG = ("-U", "--user", "flag:user")
KEY_FLAG = ("-K", "--key", "flag-key")
TOKEN_FLAGS = [("--os-storage-url", "--os-storage-url", "http://flag/v1/AUTH_f"),
               ("--os-auth-token", "--os-auth-token", "flag-tok")]


@pytest.fixture
def environ(monkeypatch):
    """No Swift credentials in the environment; ``environ(**variables)`` sets some."""
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return lambda variables: [monkeypatch.setenv(name, value)
                              for name, value in variables.items()]


def trainer_connection(flags, **kwargs):
    from hapi.client import main as cli

    args = cli.parse_args(["--dataset", "d", "--model", "myalexnet", *flags])
    return Connection(**cli.connection_options(args), **kwargs)


def loader_connection(flags):
    from hapi.client_setup import load

    args = load.build_parser().parse_args(["digits", "--container", "c", *flags])
    return load.connect(args.auth, args.user, args.key, args.os_storage_url, args.os_auth_token)


def resolved(conn):
    return {"authurl": conn.authurl, "user": conn.user, "key": conn.key,
            "auth_version": conn.auth_version, "os_options": conn.os_options,
            "url": conn.url, "token": conn.token}


@pytest.mark.parametrize(("variables", "flags", "expected"), [
    (ST, [], ("http://st/auth/v1.0", "st:user", "st-key", "1.0")),
    (OS, [], ("http://keystone/v3", "os-user", "os-pw", "3")),
    ({**OS, **ST}, [], ("http://st/auth/v1.0", "st:user", "st-key", "1.0")),
    ({**OS, "OS_AUTH_VERSION": "2.0", "OS_TENANT_NAME": "tenant", "OS_REGION_NAME": "r1"}, [],
     ("http://keystone/v3", "os-user", "os-pw", "2.0")),
    ({**ST, "ST_AUTH_VERSION": "2.0", "OS_IDENTITY_API_VERSION": "3"}, [],
     ("http://st/auth/v1.0", "st:user", "st-key", "2.0")),
    ({**ST, **OS}, [AUTH_FLAG, KEY_FLAG], ("http://flag/auth/v1.0", "st:user", "flag-key", "1.0")),
    (OS, [AUTH_FLAG, USER_FLAG, KEY_FLAG],
     ("http://flag/auth/v1.0", "flag:user", "flag-key", "1.0")),
    ({**ST, **TOKEN}, [], ("http://st/auth/v1.0", "st:user", "st-key", "1.0")),
    (TOKEN, TOKEN_FLAGS[1:], (None, None, None, "1.0")),
    ({}, TOKEN_FLAGS, (None, None, None, "1.0")),
])
def test_the_trainer_resolves_credentials_as_hapi_load(environ, variables, flags, expected):
    environ(variables)
    trainer = resolved(trainer_connection([arg for flag, _, value in flags
                                           for arg in (flag, value)]))
    loader = resolved(loader_connection([arg for _, flag, value in flags
                                         for arg in (flag, value)]))
    assert trainer == loader
    assert password(trainer) == expected


def test_the_trainer_takes_keystone_options_as_flags_before_variables(environ):
    environ(OS)
    conn = trainer_connection(["--os-project-name", "flag-proj", "--os-region-name", "r2"])
    assert conn.os_options == {"project_name": "flag-proj", "user_domain_name": "Default",
                               "region_name": "r2"}
    assert trainer_connection(["-V", "2.0"]).auth_version == "2.0"
    assert trainer_connection(["--os-identity-api-version", "2.0"]).auth_version == "2.0"


def test_the_trainer_names_missing_credentials_as_hapi_load(environ):
    from hapi.client import main as cli
    from hapi.client_setup import load

    environ({"ST_USER": "acct:me"})
    with pytest.raises(cli.SwiftAuthError) as trainer_error:
        trainer_connection([])
    with pytest.raises(load.LoadError) as loader_error:
        loader_connection([])
    trainer_message, loader_message = str(trainer_error.value), str(loader_error.value)
    assert trainer_message.startswith("no Swift credentials: missing the auth URL ")
    assert trainer_message.split("; as flags:")[0] == loader_message.split("; as flags:")[0]
    assert trainer_message.endswith("as flags: -A/-U/-K, or --os-storage-url and "
                                    "--os-auth-token")


# -- against a real Swift -----------------------------------------------------

def test_the_trainer_connects_with_environment_credentials_or_a_token(swift_cluster, environ):
    from hapi.client import main as cli

    user, key = swift_cluster.users["tester"]
    environ({"ST_AUTH": swift_cluster.auth_url, "ST_USER": user, "ST_KEY": key})
    args = cli.parse_args(["--dataset", "d", "--model", "myalexnet"])
    conn = cli.swift_connector(args)()
    url, token = conn.url, conn.token
    assert conn.head_account()["x-account-object-count"] is not None
    conn.close()
    environ({"ST_KEY": "wrong"})
    with pytest.raises(cli.SwiftAuthError, match=f"refused {user}: 401"):
        cli.swift_connector(args)
    environ({"OS_STORAGE_URL": url, "OS_AUTH_TOKEN": token})
    by_token = cli.swift_connector(args)()
    assert (by_token.url, by_token.token) == (url, token)
    assert by_token.head_account()["x-account-object-count"] is not None
    by_token.close()
