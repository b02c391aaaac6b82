"""Swift credentials: flags, then ST_*, then OS_*, as python-swiftclient's ``swift`` command."""

import pytest

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
