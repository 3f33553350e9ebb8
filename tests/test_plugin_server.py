"""The OpenAI server path: ``python -m vllm.entrypoints.openai.api_server
--quantization scalesweep`` (what ``vllm serve`` runs), on 127.0.0.1, stopped by pid.
Also: without the flag, stock vLLM does on our checkpoint exactly what it does
with the plugin not installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from plugin_support import free_port, tiny_checkpoint

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

STARTUP_S = 300  # bounded: about 30 s on 2 cores, more when the machine is busy


def _env(**extra):
    env = dict(os.environ)
    env.update(VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", **extra)
    for var in ("SCALESWEEP_ACTIVATIONS", "SCALESWEEP_KV_CACHE", "SCALESWEEP_QUERY"):
        env.pop(var, None)
    return env


def _post(url, body, timeout=120):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _stop(proc):
    """SIGTERM to the server's pid; if it lingers, SIGKILL to the session we created."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4")
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(ckpt), "--quantization", "scalesweep",
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "256",
        "--served-model-name", "tiny",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_S} s")
            time.sleep(1)
        yield base, proc, log
    finally:
        _stop(proc)
        log.close()


def test_completion(server):
    base, _, log = server
    out = _post(base + "/v1/completions",
                {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 8,
                 "temperature": 0})  # fmt: skip
    assert out["usage"]["completion_tokens"] == 8
    assert isinstance(out["choices"][0]["text"], str) and out["choices"][0]["text"]
    log.seek(0)
    assert "scalesweep: " in log.read()  # our config was the one that loaded


def test_eight_concurrent_requests_are_deterministic(server):
    base = server[0]
    prompts = [f"Request number {i} says" for i in range(8)]

    def one(p):
        body = {"model": "tiny", "prompt": p, "max_tokens": 6, "temperature": 0}
        return _post(base + "/v1/completions", body)["choices"][0]["text"]

    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(one, prompts))
    alone = [one(p) for p in prompts[:2]]
    assert all(isinstance(t, str) and t for t in together)
    # Runtime quantization is per token: batching must not change a request's answer.
    assert together[:2] == alone


def test_server_stops_by_pid(server):
    _, proc, _ = server
    _stop(proc)
    assert proc.returncode is not None


_STOCK = """
import json, os, sys, traceback
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import vllm
try:
    llm = vllm.LLM(sys.argv[1], enforce_eager=True, dtype="bfloat16", max_model_len=128,
                   kv_cache_memory_bytes=64 << 20)
    out = llm.generate(["Hello"], vllm.SamplingParams(temperature=0, max_tokens=4))
    res = {"ok": True, "tokens": list(out[0].outputs[0].token_ids)}
except Exception as e:
    res = {"ok": False, "error": type(e).__name__, "message": str(e).splitlines()[0][:300]}
print("RESULT " + json.dumps(res))
"""


def _stock_run(ckpt, plugins):
    env = _env(VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    p = subprocess.run([sys.executable, "-c", _STOCK, str(ckpt)], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(lines[-1][7:])


def test_without_the_flag_stock_behaviour_is_unchanged(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, "W4A4KV4Q4")
    with_plugin = _stock_run(ckpt, None)
    without_plugin = _stock_run(ckpt, "")  # VLLM_PLUGINS="": no general plugin loads
    assert with_plugin == without_plugin
    assert "scalesweep" not in json.dumps(with_plugin)
