"""client/main.py --use_intermediate: feature requests to the standalone HAPI
server, everything else to Swift, and the same training as in the proxy.

The standalone server runs as a subprocess in front of the session's Swift
cluster. The data set is the first 240 of scikit-learn's digits in 10 shards
of 24; EfficientNet-Lite0 with its pre-trained weights at 32 px.
"""


import pytest
from helpers import ServerProcess, upload_digits

from hapi.client import main as cli

CONTAINER = "hapi-intermediate-digits"
SAMPLES, SHARD_SIZE, FREEZE = 240, 24, 21
FLAGS = ["--dataset", CONTAINER, "--model", "myefficientnet_lite0", "--freeze",
         "--preset", "resize-32", "--batch_size", "20", "--storage_batch", "7",
         "--lr", "0.05", "--threads", "1"]


@pytest.fixture(scope="module")
def cluster(swift_cluster):
    upload_digits(swift_cluster, CONTAINER, SAMPLES, SHARD_SIZE)
    return swift_cluster


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    with ServerProcess(cluster.proxy_url, tmp_path_factory.mktemp("hapi-server"),
                       {"threads": "1"}) as server:
        yield server


def train(cluster, *flags):
    """Run client/main.py in this process; return its metrics and the keys of each step."""
    user, key = cluster.users["tester"]
    keys = []
    args = cli.parse_args([*FLAGS, *flags, "-A", cluster.auth_url, "-U", user, "-K", key])
    metrics = cli.run(args, on_step=lambda step: keys.append(step.keys), log=lambda line: None)
    return metrics, keys


def feature_requests(server):
    """How many feature streams of the data set the server's log says it completed."""
    return sum(f"/{CONTAINER}/" in line and "outcome=complete" in line
               for line in server.log_text().splitlines())


def test_training_through_the_server_equals_training_in_the_proxy(cluster, server):
    split = ["--manual_split", "--split_idx", str(FREEZE)]
    in_proxy, proxy_keys = train(cluster, *split)
    before = feature_requests(server)
    via_server, server_keys = train(cluster, *split, "--use_intermediate",
                                    "--intermediate_url", server.url)
    assert via_server["storage_endpoint"] == server.url
    assert in_proxy["storage_endpoint"] == "proxy"
    assert feature_requests(server) - before == SAMPLES // SHARD_SIZE  # training + held out
    assert server_keys == proxy_keys
    for epoch, reference in zip(via_server["epochs"], in_proxy["epochs"], strict=True):
        assert epoch["step_loss"] == pytest.approx(reference["step_loss"], rel=1e-6)
        assert epoch["accuracy"] == reference["accuracy"]
    # The same frames; only the timings in their metadata differ.
    assert via_server["bytes_received"] == pytest.approx(in_proxy["bytes_received"], rel=1e-3)


def test_vanilla_shards_still_come_from_swift(cluster, server, monkeypatch):
    """At split 0 nothing is asked of the server: the raw shards come from
    Swift (the server would refuse a GET without HAPI headers)."""
    monkeypatch.setenv("HAPI_INTERMEDIATE_URL", server.url)
    before = feature_requests(server)
    metrics, keys = train(cluster, "--split_idx", "0", "--use_intermediate", "--holdout", "0")
    assert metrics["mode"] == "vanilla"
    assert metrics["bytes_received"] == metrics["raw_shard_bytes"]
    assert len({key for step in keys for key in step}) == SAMPLES
    assert feature_requests(server) == before


@pytest.mark.parametrize(("flags", "message"), [
    ([], "--use_intermediate needs the standalone HAPI server's URL"),
    (["--intermediate_url", "127.0.0.1:8090"], "expected http://HOST:PORT"),
    (["--intermediate_url", "http://127.0.0.1:8090/v1/AUTH_test"], "expected http://HOST:PORT"),
])
def test_a_missing_or_bad_server_url_is_one_clear_line(monkeypatch, capsys, flags, message):
    monkeypatch.delenv("HAPI_INTERMEDIATE_URL", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--dataset", "d", "--model", "myalexnet", "--use_intermediate", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_server_url_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("HAPI_INTERMEDIATE_URL", "http://storage-node:8090/")
    args = cli.parse_args(["--dataset", "d", "--model", "myalexnet", "--use_intermediate"])
    assert args.intermediate_url == "http://storage-node:8090"
    assert cli.train_config(args, log=lambda line: None).intermediate_url == \
        "http://storage-node:8090"
    without = cli.parse_args(["--dataset", "d", "--model", "myalexnet"])
    assert cli.train_config(without, log=lambda line: None).intermediate_url is None
