"""The hapi-swift CLI and the Cluster API: start, status, restart, stop."""

import configparser
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paste.deploy import loadfilter
from swiftclient.client import Connection

from hapi.middleware.options import OPTION_DEFAULTS
from hapi.server_setup import cluster as cluster_mod
from hapi.server_setup.cluster import SERVERS, Cluster, ClusterError, main


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_env(line):
    """{"ST_AUTH": ..., ...} from ``export ST_AUTH=... ST_USER=... ST_KEY=...``."""
    assert line.startswith("export ")
    return dict(item.split("=", 1) for item in line.split()[1:])


@pytest.mark.swift
def test_cli_lifecycle(tmp_path, capsys):
    root = tmp_path / "cluster"
    port = free_port()

    assert main(["start", str(root), "--proxy-port", str(port), "--without-hapi"]) == 0
    assert "ready in" in capsys.readouterr().out
    try:
        status = Cluster(root).status()
        assert all(info["alive"] for info in status.values()), status
        assert status["proxy"]["port"] == port

        assert main(["start", str(root)]) == 0
        assert "already running" in capsys.readouterr().out
        assert Cluster(root).status() == status

        other = free_port()
        assert main(["start", str(root), "--proxy-port", str(other)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err == (
            f"hapi-swift: cluster in {root} is already running with its proxy on port {port}, "
            f"not {other}; stop it first to move it\n")
        assert Cluster(root).status() == status

        assert main(["env", str(root)]) == 0
        env = parse_env(capsys.readouterr().out.strip())
        assert env["ST_AUTH"] == f"http://127.0.0.1:{port}/auth/v1.0"
        conn = Connection(authurl=env["ST_AUTH"], user=env["ST_USER"], key=env["ST_KEY"])
        conn.put_container("cli")
        assert [c["name"] for c in conn.get_account()[1]] == ["cli"]

        assert main(["status", str(root)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == [f"{s}-server" for s in SERVERS]
        assert all(" alive " in line for line in lines)
    finally:
        assert main(["stop", str(root)]) == 0

    assert "stopped proxy-server" in capsys.readouterr().out
    assert not any(info["alive"] for info in Cluster(root).status().values())
    assert main(["status", str(root)]) == 0
    assert all(" dead " in line for line in capsys.readouterr().out.splitlines())
    for server in SERVERS:
        assert (root / "log" / f"{server}.log").stat().st_size > 0
    assert main(["stop", str(root)]) == 0
    assert "not running" in capsys.readouterr().out


@pytest.mark.swift
def test_restart_keeps_data_ports_and_hash_settings(tmp_path):
    cluster = Cluster(tmp_path, with_hapi=False)
    with cluster:
        cluster.connection().put_container("kept")
        cluster.connection().put_object("kept", "obj", b"payload")
    swift_conf = (tmp_path / "etc" / "swift.conf").read_text()
    ports = dict(cluster.ports)

    restarted = Cluster(tmp_path, with_hapi=False)
    with restarted:
        assert restarted.ports == ports
        assert restarted.connection().get_object("kept", "obj")[1] == b"payload"
    assert (tmp_path / "etc" / "swift.conf").read_text() == swift_conf


def test_accounts_exist_after_start(swift_cluster):
    """A real account keeps its creation time; an auto-created stand-in says "now"."""
    for admin in ("test:tester", "test2:tester2"):
        conn = swift_cluster.connection(admin)
        created = conn.head_account()["x-timestamp"]
        time.sleep(0.02)
        assert conn.head_account()["x-timestamp"] == created


def read_conf(path):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return parser


def test_pipeline_with_and_without_hapi(tmp_path):
    with_hapi = Cluster(tmp_path / "a", hapi_conf={"max_batch": "64"})
    without = Cluster(tmp_path / "b", with_hapi=False)
    for cluster in (with_hapi, without):
        cluster.set_up()
    conf = read_conf(with_hapi.conf_path("proxy"))
    assert " tempauth hapi copy " in conf["pipeline:main"]["pipeline"]
    assert dict(conf["filter:hapi"]) == {
        **dict(conf["DEFAULT"]), "use": "egg:hapi-tl#hapi", "max_batch": "64"}
    plain = read_conf(without.conf_path("proxy"))
    assert " tempauth copy " in plain["pipeline:main"]["pipeline"]
    assert not plain.has_section("filter:hapi")


def test_conf_snippet_loads_the_filter():
    """The documented [filter:hapi] section, defaults included, loads through paste."""
    snippet = Path(cluster_mod.__file__).with_name("proxy-server.hapi.conf")
    make_filter = loadfilter(f"config:{snippet}", name="hapi")
    assert callable(make_filter(lambda env, start_response: []))


def test_conf_snippet_lists_every_filter_option_with_its_default():
    """proxy-server.hapi.conf shows every option of the filter, each with its default."""
    snippet = Path(cluster_mod.__file__).with_name("proxy-server.hapi.conf")
    section = dict(read_conf(snippet)["filter:hapi"])
    assert section.pop("use") == "egg:hapi-tl#hapi"
    assert section == {name: str(value) for name, value in OPTION_DEFAULTS.items()}


def test_busy_proxy_port_is_a_clear_error_and_leaves_nothing_behind(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ClusterError, match=f"proxy port {port} is already in use"):
            Cluster(tmp_path, proxy_port=port).start()
        assert list(tmp_path.iterdir()) == []
        assert main(["start", str(tmp_path / "new"), "--proxy-port", str(port)]) == 1
        assert capsys.readouterr().err == f"hapi-swift: proxy port {port} is already in use\n"
        assert not (tmp_path / "new").exists()


def test_failed_first_set_up_removes_the_folder_it_made(tmp_path, monkeypatch):
    def no_xattrs(folder):
        raise ClusterError(f"{folder} does not support user xattrs")

    monkeypatch.setattr(cluster_mod, "_check_xattrs", no_xattrs)
    with pytest.raises(ClusterError, match="xattrs"):
        Cluster(tmp_path / "new").set_up()
    assert not (tmp_path / "new").exists()


@pytest.mark.swift
def test_failed_start_stops_servers_and_shows_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_mod, "PIPELINE", "catch_errors no_such_filter proxy-server")
    cluster = Cluster(tmp_path, with_hapi=False)
    with pytest.raises(ClusterError, match="proxy exited") as failure:
        cluster.start(timeout=30)
    assert "log/proxy.log (last" in str(failure.value)
    assert "no_such_filter" in str(failure.value)
    assert not any(info["alive"] for info in cluster.status().values())


def test_runs_as_a_module(tmp_path):
    Cluster(tmp_path).set_up()
    result = subprocess.run([sys.executable, "-m", "hapi.server_setup.cluster", "status",
                             str(tmp_path)], capture_output=True, text=True, check=True)
    assert "proxy-server" in result.stdout and " dead " in result.stdout


def test_status_of_a_folder_never_set_up(tmp_path, capsys):
    assert main(["status", str(tmp_path / "missing")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (f"hapi-swift: {tmp_path / 'missing'} is not set up: "
                                 "run start first\n")


def test_env_on_a_folder_never_set_up(tmp_path, capsys):
    assert main(["env", str(tmp_path)]) == 1
    assert "is not set up" in capsys.readouterr().err


def test_normal_operation_logs_no_missing_cache(swift_cluster):
    """Logins, container and object requests and a feature request: the proxy
    log holds no ``swift.cache could not be found`` (tempauth asks for the
    cache at every login)."""
    conn = swift_cluster.connection()
    for index in range(3):
        conn.get_auth()
        conn.put_container("test-cluster-cache")
        conn.put_object("test-cluster-cache", f"obj-{index}", b"payload")
        assert conn.get_object("test-cluster-cache", f"obj-{index}")[1] == b"payload"
    conn.close()
    log = swift_cluster.log_path("proxy").read_text()
    assert "tempauth" in read_conf(swift_cluster.conf_path("proxy"))["pipeline:main"]["pipeline"]
    assert "GET /v1/AUTH_test/test-cluster-cache/obj-2" in log
    assert "swift.cache" not in log


@pytest.mark.swift
def test_cli_with_two_proxies(tmp_path, capsys):
    """--proxies 2: two proxy processes on consecutive ports, each serving the
    same account with the first one's token; env lists both; stop stops both."""
    root = tmp_path / "cluster"
    port = free_port()
    while not cluster_mod._port_free("127.0.0.1", port + 1):
        port = free_port()
    assert main(["start", str(root), "--proxies", "2", "--proxy-port", str(port),
                 "--without-hapi"]) == 0
    capsys.readouterr()
    try:
        status = Cluster(root).status()
        assert list(status) == [*SERVERS, "proxy2"]
        assert all(info["alive"] for info in status.values()), status
        assert [status["proxy"]["port"], status["proxy2"]["port"]] == [port, port + 1]
        assert status["proxy"]["pid"] != status["proxy2"]["pid"]

        assert main(["env", str(root)]) == 0
        env = parse_env(capsys.readouterr().out.strip())
        urls = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        assert env["HAPI_STORAGE_URLS"] == ",".join(urls)
        assert Cluster(root).proxy_urls == urls
        first = Connection(authurl=env["ST_AUTH"], user=env["ST_USER"], key=env["ST_KEY"])
        first.put_container("two")
        first.put_object("two", "obj", b"payload")
        url, token = first.get_auth()
        second = Connection(preauthurl=url.replace(f":{port}/", f":{port + 1}/"),
                            preauthtoken=token)
        assert second.get_object("two", "obj")[1] == b"payload"
        log = (root / "log" / "proxy2.log").read_text()
        assert "GET /v1/AUTH_test/two/obj" in log

        assert main(["start", str(root), "--proxies", "3"]) == 1
        assert "already running with 2 proxies, not 3" in capsys.readouterr().err
        assert main(["status", str(root)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == [
            *(f"{s}-server" for s in SERVERS), "proxy2-server"]
    finally:
        assert main(["stop", str(root)]) == 0
    assert "stopped proxy2-server" in capsys.readouterr().out
    assert not any(info["alive"] for info in Cluster(root).status().values())


def test_proxies_must_be_at_least_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["start", str(tmp_path), "--proxies", "0"])
    assert "--proxies: expected a whole number of at least 1, got '0'" in \
        capsys.readouterr().err
    with pytest.raises(ClusterError, match="at least 1 proxy"):
        Cluster(tmp_path, proxies=0)
