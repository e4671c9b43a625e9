"""kvmesh.IndexClient against a real `kvmesh serve` fed by a real ZMQ publisher of vLLM-format
KV events (msgpack batches, as vLLM's ZmqEventPublisher sends them)."""

import os
import socket
import struct
import subprocess
import threading
import time
import urllib.request

import msgpack
import pytest
import zmq

import kvmesh

MODEL = "m"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvmesh_bin():
    path = os.environ.get("KVMESH_BIN")
    if not path:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.path.join(root, "target", "debug", "kvmesh")
    assert os.path.exists(path), f"no kvmesh binary at {path}: run `cargo build` or set KVMESH_BIN"
    return path


def wait_for(what, f, timeout=20.0):
    t = time.time()
    while True:
        try:
            if f():
                return
        except Exception:
            pass
        assert time.time() - t < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


class Publisher:
    """A vLLM-format KV-event publisher: PUB socket, frames [topic, seq, msgpack batch]."""

    def __init__(self, port):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.seq = 0

    def stored(self, hashes, parent, first_token, block_size=16):
        event = {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": list(range(first_token, first_token + block_size * len(hashes))),
            "block_size": block_size,
            "lora_id": None,
            "medium": "GPU",
        }
        payload = msgpack.packb([time.time(), [event], 0])
        self.sock.send_multipart([b"", struct.pack(">Q", self.seq), payload])
        self.seq += 1

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture(scope="module")
def daemon():
    pub_port, http, grpc = free_port(), free_port(), free_port()
    publisher = Publisher(pub_port)
    proc = subprocess.Popen(
        [
            kvmesh_bin(), "serve", "--model", MODEL,
            "--listen", f"127.0.0.1:{http}", "--grpc-listen", f"127.0.0.1:{grpc}",
            "--engine", f"e1=tcp://127.0.0.1:{pub_port}",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for("the daemon", lambda: urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz").status == 200)
        time.sleep(0.3)
        publisher.stored([101, 102], None, 0)
        publisher.stored([103], 102, 32)
        client = kvmesh.IndexClient(f"http://127.0.0.1:{http}")
        wait_for("the events", lambda: client.score(MODEL, list(range(64)))[0].matched_blocks == 3)
        yield {"http": f"http://127.0.0.1:{http}", "grpc": f"http://127.0.0.1:{grpc}"}
    finally:
        proc.kill()
        proc.wait()
        publisher.close()


@pytest.fixture(params=["http", "grpc"])
def client(request, daemon):
    if request.param == "grpc":
        return kvmesh.IndexClient(daemon["grpc"], grpc=True)
    return kvmesh.IndexClient(daemon["http"])


def test_score_by_tokens_and_hashes(client):
    [e] = client.score(MODEL, list(range(64)))
    assert (e.name, e.matched_blocks, e.matched_tokens, e.gpu) == ("e1", 3, 48, 3)
    assert e.score > 0
    # A prompt diverging in block 2 matches 1 block; another model matches nothing.
    assert client.score(MODEL, list(range(16)) + [9999] * 16)[0].matched_blocks == 1
    assert client.score("other-model", list(range(64))) == []
    [h] = client.score(MODEL, block_hashes=[101, 102], engines=["e1"])
    assert h.matched_blocks == 2


def test_score_many_matches_score(client):
    prompts = [list(range(n)) for n in range(0, 80, 3)]
    many = client.score_many(MODEL, prompts)
    assert len(many) == len(prompts)
    for p, answer in zip(prompts, many):
        want = min(len(p) // 16, 3)
        got = answer[0].matched_blocks if answer else 0
        assert got == want, (len(p), got)


def test_engines_added_and_removed(client):
    [e] = [e for e in client.engines() if e.name == "e1"]
    assert e.state == "connected" and e.last_seq == 1 and e.blocks["gpu"] == 3
    client.add_engine("e9", f"tcp://127.0.0.1:{free_port()}", model=MODEL)
    assert "e9" in [e.name for e in client.engines()]
    with pytest.raises(kvmesh.KvmeshError) as err:
        client.add_engine("e9", f"tcp://127.0.0.1:{free_port()}")
    assert err.value.args[1] == 409
    client.remove_engine("e9")
    with pytest.raises(kvmesh.KvmeshError) as err:
        client.remove_engine("e9")
    assert err.value.args[1] == 404


def test_bad_requests_raise_clearly(client):
    with pytest.raises(ValueError, match="exactly one"):
        client.score(MODEL)
    with pytest.raises(ValueError, match="exactly one"):
        client.score(MODEL, [1], block_hashes=[1])
    with pytest.raises(kvmesh.KvmeshError, match="unknown engine") as err:
        client.score(MODEL, [1, 2, 3], engines=["nope"])
    assert err.value.args[1] == 404
    with pytest.raises(OverflowError):
        client.score(MODEL, [-1])


def test_threads_share_a_client(client):
    errors = []

    def work():
        try:
            for n in range(200):
                got = client.score(MODEL, list(range(n % 70)))
                want = min((n % 70) // 16, 3)
                assert (got[0].matched_blocks if got else 0) == want
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_dead_daemon_is_a_connection_error():
    port = free_port()
    with pytest.raises(ConnectionError):
        kvmesh.IndexClient(f"http://127.0.0.1:{port}").engines()
    with pytest.raises(ConnectionError):
        kvmesh.IndexClient(f"http://127.0.0.1:{port}", grpc=True)
