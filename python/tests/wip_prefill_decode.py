"""Prefill/decode through `kvmesh proxy` between two vLLM engines in separate network namespaces.

NOT YET PART OF THE SUITE: the decode engine's pull from the prefill engine fails intermittently
(the prefill agent's connection is closed mid-session and later connects are refused), and after a
failed asynchronous pull the decode request can hang. Run it by hand while fixing that:

    .cache/vllm-venv/bin/python -m pytest -s python/tests/wip_prefill_decode.py
"""

from test_vllm_connector import *  # noqa: F401,F403
from test_vllm_connector import (  # noqa: F401
    ROOT, Engine, complete, engines, free_port, http_post_json, metric, prompts, disk_dir)
import json, os, re, subprocess, time, urllib.request  # noqa: E401

# --- prefill/decode across two network namespaces -------------------------------------------

def kvmesh_bin() -> str:
    path = os.environ.get("KVMESH_BIN") or str(ROOT / "target" / "debug" / "kvmesh")
    assert os.path.exists(path), f"no kvmesh binary at {path}: run `cargo build` or set KVMESH_BIN"
    return path


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    assert r.returncode == 0, f"`ip {' '.join(args)}` failed: {r.stderr.strip()}"


class NetnsEngine(Engine):
    """An engine started inside a network namespace (its own network stack and address)."""

    def __init__(self, netns: str, *a, **kw):
        super().__init__(*a, **kw)
        self.netns = netns

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().command()]


@pytest.fixture(scope="module")
def two_hosts():
    """Two network namespaces, 10.78.0.2 and 10.78.0.3, on a bridge with this host at 10.78.0.1."""
    assert os.geteuid() == 0, "the prefill/decode test needs root to create network namespaces"
    tag = str(os.getpid() % 10000)
    br, hosts = f"kvbr{tag}", [(f"kvp{tag}", "10.78.0.2"), (f"kvd{tag}", "10.78.0.3")]
    made = []
    try:
        ip("link", "add", br, "type", "bridge")
        made.append(("link", br))
        ip("addr", "add", "10.78.0.1/24", "dev", br)
        ip("link", "set", br, "up")
        for i, (ns, addr) in enumerate(hosts):
            ip("netns", "add", ns)
            made.append(("netns", ns))
            host_end, ns_end = f"kvh{tag}{i}", f"kvn{tag}{i}"
            ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            made.append(("link", host_end))
            ip("link", "set", ns_end, "netns", ns)
            ip("link", "set", host_end, "master", br)
            ip("link", "set", host_end, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_end)
            ip("-n", ns, "link", "set", ns_end, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for kind, name in reversed(made):
            subprocess.run(["ip", kind, "del", name], capture_output=True)


@pytest.fixture(scope="module")
def pd(two_hosts, engines):
    (pns, pip), (dns, dip) = two_hosts
    started = []
    try:
        p = NetnsEngine(pns, "prefill", free_port(), free_port(), free_port(), num_blocks=48,
                        host=pip, extra_args=["--kv-transfer-config", json.dumps({
                            "kv_connector": "KvmeshConnector",
                            "kv_connector_module_path": "kvmesh.vllm", "kv_role": "kv_both",
                            "kv_connector_extra_config": {"transfer_host": pip,
                                                          "transfer_backend": "tcp"}})])
        d = NetnsEngine(dns, "decode", free_port(), free_port(), free_port(), num_blocks=48,
                        host=dip, extra_args=["--kv-transfer-config", json.dumps({
                            "kv_connector": "KvmeshConnector",
                            "kv_connector_module_path": "kvmesh.vllm", "kv_role": "kv_both",
                            "kv_connector_extra_config": {"transfer_host": dip,
                                                          "transfer_backend": "tcp"}})])
        for e in (p, d):
            started.append(e)
            e.start()
        # Port 0: the proxy picks a free port and says which on its first line.
        proxy = subprocess.Popen(
            [kvmesh_bin(), "proxy", "--listen", "127.0.0.1:0", "--prefill", p.url, "--decode", d.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = proxy.stderr.readline()
        m = re.search(r"listening on (http://\S+)", line)
        assert m, f"kvmesh proxy did not start: {line}{proxy.stderr.read() if proxy.poll() is not None else ''}"
        url = m.group(1)
        yield p, d, url
        proxy.terminate()
        proxy.wait(10)
    finally:
        for e in reversed(started):
            e.stop()


def test_prefill_decode_across_network_namespaces(pd, engines):
    p, d, url = pd
    plain, _ = engines
    for i, q in enumerate(prompts(6, 4, 500) + prompts(7, 2, 130)):
        want, _ = complete(plain, q)
        r = http_post_json(f"{url}/v1/completions", {
            "model": "tiny", "prompt": q, "max_tokens": 16, "temperature": 0})
        assert r["choices"][0]["text"] == want, f"prompt {i}: prefill/decode changed the output"
    # The decode engine pulled the prompts' blocks from the prefill engine (source p2p), and the
    # prefill engine freed them after the reads.
    pulled = metric(d, "vllm:prompt_tokens_cached_by_source_total", source="p2p")
    assert pulled >= 4 * 480, f"the decode engine pulled only {pulled} tokens"
    assert metric(d, "vllm:prompt_tokens_by_source_total") >= 0
    t = time.time()
    while metric(p, "vllm:kv_cache_usage_perc") > 0.0 and time.time() - t < 10:
        time.sleep(0.2)
    assert metric(p, "vllm:kv_cache_usage_perc") == 0.0, "the prefill engine kept blocks nobody reads"
