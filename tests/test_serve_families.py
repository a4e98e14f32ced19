"""`pagedserve serve --model DIR` for a tiny saved checkpoint of every family: the CLI
process serves it over real loopback gRPC, and a greedy request returns transformers'
tokens."""

import signal
import subprocess

import pytest

from pagedserve.client import Client

from model_families import FAMILIES, save_tiny
from test_model import hf_greedy
from test_server import PAGEDSERVE, SERVING_STATUS, _free_port, _wait_health


@pytest.mark.parametrize("kind", FAMILIES)
def test_serve_model_dir(kind, tmp_path):
    hf = save_tiny(kind, tmp_path)
    prompt = [(5 * i + 3) % 317 + 3 for i in range(20)]  # past every window and Phi-3's 16
    want = hf_greedy(hf, [prompt], 6)[0]
    port = _free_port()
    target = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [*PAGEDSERVE, "serve", "--model", str(tmp_path), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "64",
         "--block-size", "4", "--max-model-len", "128", "--swap-space-gb", "0",
         "--disable-tracing", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_health(target, SERVING_STATUS, 120, proc)
        with Client(target, timeout=60) as c:
            reply = c.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
        assert list(reply.completions[0].token_ids) == want
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
