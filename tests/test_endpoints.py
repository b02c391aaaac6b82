"""Several storage endpoints: the trainer's requests spread over the proxies of
a cluster, and a proxy killed in the middle of an epoch.

Without Swift: the round robin and its back-off, and the checks of
``--storage_urls``. Against a one-node Swift of this module's own with two
proxy servers (one is killed here, which must not disturb the other tests):
the first 240 of scikit-learn's digits in 10 shards of 24, EfficientNet-Lite0
at 32 px split at its freeze index, as in tests/test_faults.py.
"""

import os
import re
import signal

import pytest
from helpers import upload_digits
from swiftclient import Connection

import hapi.client.main as cli
from hapi.client.endpoints import AUTH_STORAGE_URL, BACKOFF_S, Endpoints
from hapi.shards import MANIFEST_NAME, Manifest

# Without Swift -------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_round_robin_skips_a_failed_endpoint_for_a_while_then_tries_it_again():
    clock = Clock()
    endpoints = Endpoints(["http://a:1", "http://b:2"], clock=clock)
    assert [endpoints.pick() for _ in range(4)] == ["http://a:1", "http://b:2"] * 2
    endpoints.failed("http://b:2")
    assert [endpoints.pick() for _ in range(3)] == ["http://a:1"] * 3
    clock.now += BACKOFF_S
    assert endpoints.pick() == "http://b:2"
    endpoints.failed("http://b:2")  # twice in a row: skipped twice as long
    clock.now += BACKOFF_S
    assert endpoints.pick() == "http://a:1"
    assert endpoints.pick() == "http://a:1"
    clock.now += BACKOFF_S
    assert endpoints.pick() == "http://b:2"
    endpoints.succeeded("http://b:2")
    assert [endpoints.pick() for _ in range(2)] == ["http://a:1", "http://b:2"]
    assert endpoints.report() == {"http://a:1": {"requests": 8, "failures": 0},
                                  "http://b:2": {"requests": 5, "failures": 2}}


def test_when_every_endpoint_backs_off_the_first_back_again_is_used():
    clock = Clock()
    endpoints = Endpoints(["http://a:1", "http://b:2"], clock=clock)
    endpoints.failed("http://a:1")
    endpoints.failed("http://a:1")
    endpoints.failed("http://b:2")
    assert endpoints.pick() == "http://b:2"
    assert Endpoints([None]).report() == {AUTH_STORAGE_URL: {"requests": 0, "failures": 0}}


FLAGS_WITHOUT_SWIFT = ["--dataset", "d", "--model", "resnet18", "--split_idx", "0",
                       "-A", "http://127.0.0.1:9/auth/v1.0", "-U", "u:u", "-K", "k"]


@pytest.mark.parametrize(("value", "message"), [
    ("http://127.0.0.1:8080,ftp://127.0.0.1:8081",
     "--storage_urls 'ftp://127.0.0.1:8081': expected http://HOST:PORT (a Swift proxy or "
     "standalone HAPI server)"),
    ("http://127.0.0.1:8080/v1/AUTH_test",
     "--storage_urls 'http://127.0.0.1:8080/v1/AUTH_test': expected http://HOST:PORT"),
    ("http://127.0.0.1:port", "--storage_urls 'http://127.0.0.1:port': expected"),
    ("http://127.0.0.1:8080,,http://127.0.0.1:8081", "--storage_urls '': expected"),
    (" , ", "--storage_urls is empty"),
    ("http://127.0.0.1:8080,http://127.0.0.1:8080/",
     "--storage_urls names http://127.0.0.1:8080 more than once"),
])
def test_a_bad_storage_url_is_one_line_before_any_network_call(value, message, monkeypatch,
                                                               capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("a network call before the flags were checked")

    monkeypatch.setattr(cli, "Connection", no_network)
    assert cli.main([*FLAGS_WITHOUT_SWIFT, "--storage_urls", value]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err


def test_storage_urls_from_the_environment(monkeypatch):
    monkeypatch.setenv("HAPI_STORAGE_URLS", "http://127.0.0.1:8080/,http://127.0.0.1:8081")
    args = cli.parse_args(FLAGS_WITHOUT_SWIFT)
    assert args.storage_urls == ("http://127.0.0.1:8080", "http://127.0.0.1:8081")
    assert cli.train_config(args, log=lambda line: None).storage_urls == args.storage_urls


def test_with_use_intermediate_the_list_is_the_hapi_servers():
    args = cli.parse_args([*FLAGS_WITHOUT_SWIFT, "--use_intermediate", "--storage_urls",
                           "http://127.0.0.1:8090,http://127.0.0.1:8091"])
    config = cli.train_config(args, log=lambda line: None)
    assert config.intermediate_url == "http://127.0.0.1:8090"
    assert config.storage_urls == ("http://127.0.0.1:8090", "http://127.0.0.1:8091")


def test_with_use_intermediate_two_lists_of_hapi_servers_are_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HAPI_STORAGE_URLS", "http://127.0.0.1:8080,http://127.0.0.1:8081")
    assert cli.main([*FLAGS_WITHOUT_SWIFT, "--use_intermediate", "--intermediate_url",
                     "http://127.0.0.1:8090"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "both are given" in err, err


# Against Swift with two proxies ------------------------------------------------------

CONTAINER = "hapi-endpoints-digits"
SAMPLES, SHARD_SIZE, BATCH = 240, 24, 20
SHARDS = SAMPLES // SHARD_SIZE
FLAGS = ["--dataset", CONTAINER, "--model", "myefficientnet_lite0", "--freeze",
         "--manual_split", "--split_idx", "21", "--preset", "resize-32", "--batch_size",
         str(BATCH), "--storage_batch", "7", "--lr", "0.05", "--threads", "1", "--holdout", "0"]
KILL_AT_STEP = 2
SHARD_GET = re.compile(rf"GET /v1/AUTH_test/{CONTAINER}/(shard-[^ ?]+)")


@pytest.fixture(scope="module")
def cluster(swift_cluster_factory):
    cluster = swift_cluster_factory("endpoints", hapi_conf={"threads": "1"}, proxies=2)
    upload_digits(cluster, CONTAINER, SAMPLES, SHARD_SIZE)
    return cluster


def train(cluster, *flags, on_step=None):
    """Run client/main.py in this process over both proxies: its metrics, step
    records and log lines."""
    records, lines = [], []

    def record(step):
        records.append(step)
        if on_step is not None:
            on_step(step)

    user, key = cluster.users["tester"]
    args = cli.parse_args([*FLAGS, *flags, "--storage_urls", ",".join(cluster.proxy_urls),
                           "-A", cluster.auth_url, "-U", user, "-K", key])
    return cli.run(args, on_step=record, log=lines.append), records, lines


def shard_gets(cluster, proxy, skip):
    """The shards the proxy's log shows GETs of, after its first ``skip`` characters."""
    return SHARD_GET.findall(cluster.log_path(proxy).read_text()[skip:])


@pytest.fixture(scope="module")
def spread(cluster):
    """A run over both proxies, undisturbed, and what each proxy logged of it."""
    before = {proxy: len(cluster.log_path(proxy).read_text()) for proxy in cluster.proxy_names}
    metrics, records, _ = train(cluster)
    logged = {proxy: shard_gets(cluster, proxy, before[proxy])
              for proxy in cluster.proxy_names}
    return metrics, records, logged


def test_requests_are_spread_over_both_proxies(cluster, spread):
    metrics, records, logged = spread
    first, second = cluster.proxy_urls
    counts = metrics["endpoints"]
    assert set(counts) == {first, second}
    assert counts[first]["failures"] == counts[second]["failures"] == 0
    assert counts[first]["requests"] + counts[second]["requests"] == SHARDS
    assert abs(counts[first]["requests"] - counts[second]["requests"]) <= 1
    # Each proxy served its share: its log shows GETs of that many distinct shards,
    # and together the two logs show every shard.
    served = {proxy: set(names) for proxy, names in logged.items()}
    assert len(served["proxy"]) == counts[first]["requests"]
    assert len(served["proxy2"]) == counts[second]["requests"]
    assert len(served["proxy"] | served["proxy2"]) == SHARDS
    keys = [key for record in records for key in record.keys]
    assert len(keys) == len(set(keys)) == SAMPLES


def test_a_token_from_the_first_proxy_works_at_the_second(cluster):
    conn = cluster.connection()
    url, token = conn.get_auth()
    conn.close()
    second = Connection(preauthurl=url.replace(cluster.proxy_urls[0], cluster.proxy_urls[1]),
                        preauthtoken=token)
    _, body = second.get_object(CONTAINER, MANIFEST_NAME)
    assert len(Manifest.from_json(body).shards) == SHARDS
    second.close()


# Last: the second proxy stays down for the rest of the module.


def test_a_proxy_killed_mid_epoch_loses_and_repeats_no_sample(cluster, spread):
    _, reference, _ = spread
    killed = []

    def kill_second_proxy(step):
        if step.global_step == KILL_AT_STEP:
            os.kill(cluster.status()["proxy2"]["pid"], signal.SIGKILL)
            killed.append(step.global_step)

    metrics, records, lines = train(cluster, on_step=kill_second_proxy)
    assert killed == [KILL_AT_STEP]
    assert not cluster.status()["proxy2"]["alive"]
    keys = [key for record in records for key in record.keys]
    assert len(keys) == len(set(keys)) == SAMPLES
    assert [r.keys for r in records] == [r.keys for r in reference]
    first, second = cluster.proxy_urls
    counts = metrics["endpoints"]
    assert counts[second]["failures"] >= 1, counts
    assert counts[first]["failures"] == 0, counts
    # Every failed request was retried, on the first proxy, and nothing else failed.
    assert metrics["retries"]["total"] == counts[second]["failures"]
    assert counts[first]["requests"] + counts[second]["requests"] == \
        SHARDS + counts[second]["failures"]
    assert sum("; retry " in line for line in lines) == metrics["retries"]["total"]
